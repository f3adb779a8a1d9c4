//! The sample pipeline against real synthetic stores: same request, same bytes; samples equal
//! tokens cut by hand from the normalized field; planned reads decode each chunk about once per
//! block; bad requests name the field and the problem.

use std::path::Path;
use std::sync::Arc;

use atmorep_loader::epoch::Cursor;
use atmorep_loader::masking::MaskSpec;
use atmorep_loader::normalization::GlobalStats;
use atmorep_loader::pipeline::{
    FieldConfig, Normalization, Pipeline, PipelineConfig, PipelineError, Split,
};
use atmorep_loader::synth::{SynthConfig, write_store};
use atmorep_loader::tokenizer::tokenize;
use atmorep_loader::{ChunkCache, Dataset, Hyperslab, StoreLocation};
use atmorep_proto::{FieldGeometry, PeMode, TokenGeometry};

async fn store(dir: &Path) -> (Arc<Dataset>, Arc<GlobalStats>) {
    let path = dir.join("pipe.zarr");
    let cfg = SynthConfig {
        grid_deg: 5.0,
        steps: 48,
        step_hours: 6,
        levels: vec![850, 500, 300],
        variables: vec!["t".into(), "vo".into()],
        ..SynthConfig::default()
    };
    write_store(&cfg, &path).unwrap();
    let location = StoreLocation::open(path.to_str().unwrap()).unwrap();
    let dataset = Arc::new(
        Dataset::open_location(location, Arc::new(ChunkCache::new(1 << 30)))
            .await
            .unwrap(),
    );
    let stats = Arc::new(GlobalStats::compute(&dataset, None, false).await.unwrap());
    (dataset, stats)
}

fn field(name: &str, mask: MaskSpec) -> FieldConfig {
    FieldConfig {
        name: name.into(),
        levels: vec![850.0, 500.0],
        num_tokens: [4, 3, 6],
        token_size: [3, 3, 3],
        blur_sigma: 0.0,
        normalization: Normalization::Global,
        pe: PeMode::Local,
        pe_width: 16,
        mask,
    }
}

fn config() -> PipelineConfig {
    PipelineConfig {
        fields: vec![
            field(
                "t",
                MaskSpec::Bert {
                    r_max: 0.5,
                    noise_fraction: 0.1,
                    mask_value: 0.0,
                },
            ),
            FieldConfig {
                blur_sigma: 1.5,
                pe: PeMode::Global,
                ..field("vo", MaskSpec::Forecast { k: 1 })
            },
        ],
        split: Split::Train,
        split_fractions: [0.8, 0.1],
        seed: 11,
        block_steps: 16,
        samples_per_block: 8,
        buffer_blocks: 2,
        latitude_weighting: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_request_same_bytes_and_tokens_match_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let a = Pipeline::new(dataset.clone(), config(), Some(stats.clone())).unwrap();
    let b = Pipeline::new(dataset.clone(), config(), Some(stats.clone())).unwrap();
    for id in [0, 5, 13] {
        let (x, y) = (
            a.sample(2, id).await.unwrap(),
            b.sample(2, id).await.unwrap(),
        );
        assert_eq!(x, y);
        assert_ne!(
            x,
            a.sample(3, id).await.unwrap(),
            "another epoch draws another sample"
        );
    }
    // The unmasked tokens of field `t` are the normalized window, tokenized.
    let s = a.sample(0, 3).await.unwrap();
    let t = &s.fields[0];
    let w = t.window;
    let slab = Hyperslab {
        variable: "t".into(),
        time: w.time_start..w.time_start + w.size[0],
        levels: vec![0, 1],
        lat: w.lat_start..w.lat_start + w.size[1],
        lon_start: w.lon_start,
        lon_len: w.size[2],
    };
    let mut raw = dataset.read(&slab).await.unwrap();
    for (k, plane) in raw.chunks_mut(w.size[1] * w.size[2]).enumerate() {
        let level = [850.0, 500.0][k % 2];
        stats
            .normalize("t", level, dataset.times[w.time_start + k / 2], plane)
            .unwrap();
    }
    let geometry = FieldGeometry::new(vec![0, 1], TokenGeometry::new([4, 3, 6], [3, 3, 3]));
    let tokens = tokenize(&geometry, &raw);
    let numel = 27;
    let mut masked = t.masked_indices.iter();
    let mut next = masked.next();
    for (i, token) in tokens.chunks(numel).enumerate() {
        let got = &t.source[i * numel..(i + 1) * numel];
        if next == Some(&(i as u32)) {
            next = masked.next();
        } else {
            assert_eq!(got, token, "unmasked token {i}");
        }
    }
    assert_eq!(t.target.len(), t.masked_indices.len() * numel);
    assert_eq!(t.token_info.len(), 2 * 4 * 3 * 6 * 8);
    assert_eq!(t.pe.len(), 2 * 4 * 3 * 6 * 16);
    // Forecast masking of `vo`: exactly the last time slice of tokens (2 levels × 3 × 6).
    assert_eq!(s.fields[1].masked_indices.len(), 2 * 3 * 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_reads_decode_each_block_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let cfg = PipelineConfig {
        samples_per_block: 64,
        ..config()
    };
    let pipeline = Pipeline::new(dataset.clone(), cfg, Some(stats)).unwrap();
    dataset.cache().clear();
    let decoded_before = dataset
        .counters
        .decoded_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut delivered = 0u64;
    let mut seen = std::collections::HashSet::new();
    for (id, _) in pipeline
        .ids(0, 1, Cursor::start_of(0))
        .unwrap()
        .with_end_epoch(1)
    {
        let sample = pipeline.sample(0, id).await.unwrap();
        delivered += sample
            .fields
            .iter()
            .map(|f| (f.source.len() * 4) as u64)
            .sum::<u64>();
        assert!(seen.insert(id));
    }
    assert_eq!(seen.len() as u64, pipeline.num_samples());
    let decoded = dataset
        .counters
        .decoded_bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        - decoded_before;
    // Every (time step, level) chunk of each block is decoded once: 38 train steps of 3 levels
    // × 2 variables (whole globe, one chunk each).
    let plane = (dataset.lats.len() * dataset.lons.len() * 4) as u64;
    assert!(decoded <= 38 * 3 * 2 * plane, "decoded {decoded}");
    let amplification = decoded as f64 / delivered as f64;
    assert!(amplification < 2.0, "read amplification {amplification}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let check = |cfg: PipelineConfig, stats: Option<Arc<GlobalStats>>, needles: &[&str]| {
        let err = Pipeline::new(dataset.clone(), cfg, stats).unwrap_err();
        let message = err.to_string();
        for needle in needles {
            assert!(
                message.contains(needle),
                "`{message}` should mention `{needle}`"
            );
        }
        err
    };
    let mut cfg = config();
    cfg.fields[0].num_tokens = [4, 20, 6];
    check(cfg, Some(stats.clone()), &["`t`", "does not fit"]);
    let mut cfg = config();
    cfg.fields[1].levels = vec![925.0];
    check(cfg, Some(stats.clone()), &["`vo`", "925"]);
    let mut cfg = config();
    cfg.fields[0].name = "q".into();
    let err = check(cfg, Some(stats.clone()), &["`q`"]);
    assert!(matches!(err, PipelineError::Store(_)));
    let mut cfg = config();
    cfg.fields[0].mask = MaskSpec::Bert {
        r_max: 1.0,
        noise_fraction: 0.1,
        mask_value: 0.0,
    };
    check(cfg, Some(stats.clone()), &["`t`", "r_max"]);
    let mut cfg = config();
    cfg.split = Split::Validation; // 5 steps: no room for a 12-step window
    check(cfg, Some(stats.clone()), &["12"]);
    check(config(), None, &["`t`", "statistics"]);
    let mut cfg = config();
    cfg.fields[0].pe_width = 7;
    check(cfg, Some(stats.clone()), &["`t`"]);
    let pipeline = Pipeline::new(dataset.clone(), config(), Some(stats)).unwrap();
    let err = pipeline
        .sample(0, pipeline.num_samples())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("outside"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_normalization_uses_per_point_monthly_statistics() {
    use atmorep_loader::local_stats::LocalStats;
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let local = Arc::new(
        LocalStats::compute(&dataset, &["t".to_string()], false)
            .await
            .unwrap(),
    );
    let mut cfg = config();
    cfg.fields.truncate(1);
    cfg.fields[0].normalization = Normalization::Local;
    cfg.fields[0].mask = MaskSpec::None;
    let err = Pipeline::new(dataset.clone(), cfg.clone(), Some(stats.clone())).unwrap_err();
    assert!(err.to_string().contains("local statistics"), "{err}");
    let pipeline =
        Pipeline::with_statistics(dataset.clone(), cfg, None, Some(local.clone())).unwrap();
    let sample = pipeline.sample(0, 4).await.unwrap();
    let t = &sample.fields[0];
    let w = t.window;
    // Token 0 is level 0, first time/lat/lon token; its first value is the window's corner.
    let slab = Hyperslab {
        variable: "t".into(),
        time: w.time_start..w.time_start + 1,
        levels: vec![0],
        lat: w.lat_start..w.lat_start + 1,
        lon_start: w.lon_start,
        lon_len: 1,
    };
    let x = dataset.read(&slab).await.unwrap()[0];
    let (_, month) = atmorep_loader::normalization::year_month(dataset.times[w.time_start]);
    let field = &local.fields["t"];
    let plane = dataset.lats.len() * dataset.lons.len();
    let i = ((month as usize - 1) * field.levels.len()) * plane
        + w.lat_start * dataset.lons.len()
        + w.lon_start;
    let expected = (x - field.mean[i]) / field.std[i];
    assert!(
        (t.source[0] - expected).abs() < 1e-5,
        "{} vs {expected}",
        t.source[0]
    );
}
