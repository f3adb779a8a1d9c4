//! The sample pipeline against real synthetic stores: same request, same bytes; samples equal
//! tokens cut by hand from the normalized field; planned reads decode each chunk about once per
//! block; bad requests name the field and the problem.

use std::path::Path;
use std::sync::Arc;

use atmorep_loader::pipeline::epoch::EpochCursor;
use atmorep_loader::pipeline::masking::MaskSpec;
use atmorep_loader::pipeline::normalization::GlobalStats;
use atmorep_loader::pipeline::{
    FieldConfig, Normalization, Pipeline, PipelineConfig, PipelineError, Split,
};
use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, Hyperslab, StoreLocation};
use atmorep_proto::tokenize::tokenize;
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
    write_store(&cfg, &path, &NoProgress).unwrap();
    let location = StoreLocation::open(path.to_str().unwrap()).unwrap();
    let dataset = Arc::new(
        Dataset::open_location(location, Arc::new(ChunkCache::new(1 << 30)))
            .await
            .unwrap(),
    );
    let stats = Arc::new(
        GlobalStats::compute(&dataset, None, &NoProgress)
            .await
            .unwrap(),
    );
    (dataset, stats)
}

fn field(name: &str, mask: MaskSpec) -> FieldConfig {
    FieldConfig {
        name: name.into(),
        reply_name: None,
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
        split_dates: None,
        mode: Default::default(),
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
    // Finished samples hand their buffers back and later samples reuse them with the old
    // values still in them: every value of a new sample must be written afresh.
    let fresh = b.sample(4, 7).await.unwrap();
    for id in [1, 2, 3, 4] {
        a.recycle(a.sample(1, id).await.unwrap());
    }
    assert!(a.pool().held_bytes() > 0);
    assert_eq!(a.sample(4, 7).await.unwrap(), fresh);
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
    let local = atmorep_proto::positional::encode(
        PeMode::Local,
        &geometry,
        16,
        &atmorep_proto::positional::PeInputs::default(),
    )
    .unwrap();
    assert!(t.pe == local, "field `t`'s local encoding");
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
        .ids(0, 1, EpochCursor::start_of(0))
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
    use atmorep_loader::pipeline::normalization::LocalStats;
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let local = Arc::new(
        LocalStats::compute(&dataset, &["t".to_string()], &NoProgress)
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
    let (_, month) =
        atmorep_loader::pipeline::normalization::year_month(dataset.times[w.time_start]);
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

/// The batch stream delivers every id of the epoch once, in the epoch's order, flags the last
/// batch, resumes from a mid-epoch cursor with exactly the rest (same bytes), and gives its
/// memory reservations back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_cover_the_epoch_once_and_resume_exactly() {
    use atmorep_loader::pipeline::{BatchSpec, MemoryBudget};

    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let pipeline = Arc::new(Pipeline::new(dataset, config(), Some(stats)).unwrap());
    let budget = MemoryBudget::new(3 * pipeline.sample_bytes());
    let spec = |start: EpochCursor| BatchSpec {
        rank: 0,
        world: 1,
        start,
        end_epoch: Some(1),
        batch_size: 5,
        sample_concurrency: 4,
        prefetch_batches: 2,
        memory: Some(budget.clone()),
    };
    let mut stream = pipeline.batches(spec(EpochCursor::start_of(0))).unwrap();
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        let mut batch = batch.unwrap();
        assert!(batch.samples.len() <= 5);
        // A batch holds its share of the budget until the consumer lets go of it.
        assert!(budget.available_bytes() < budget.total_bytes());
        drop(batch.reservation.take());
        batches.push(batch);
    }
    let n = pipeline.num_samples();
    let ids: Vec<u64> = batches
        .iter()
        .flat_map(|b| b.samples.iter().map(|s| s.id))
        .collect();
    let expected: Vec<u64> = pipeline
        .ids(0, 1, EpochCursor::start_of(0))
        .unwrap()
        .with_end_epoch(1)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, expected, "the epoch's order");
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "every id once");
    assert!(batches.last().unwrap().last);
    assert!(batches[..batches.len() - 1].iter().all(|b| !b.last));
    assert_eq!(
        batches.last().unwrap().cursor_after,
        EpochCursor::start_of(1)
    );

    // Resume after the second batch.
    let cursor = batches[1].cursor_after;
    let mut resumed = pipeline.batches(spec(cursor)).unwrap();
    let mut rest = Vec::new();
    while let Some(batch) = resumed.next().await {
        rest.extend(batch.unwrap().samples);
    }
    let original: Vec<_> = batches[2..]
        .iter()
        .flat_map(|b| b.samples.clone())
        .collect();
    assert_eq!(rest, original, "the rest of the epoch, same bytes");

    drop(batches);
    drop(stream);
    assert_eq!(budget.available_bytes(), budget.total_bytes());
}

fn iso(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .unwrap()
        .to_rfc3339()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_by_date_keep_windows_inside_their_range() {
    use atmorep_loader::pipeline::SplitDates;

    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let times = dataset.times.clone();
    let dated = |split| PipelineConfig {
        split,
        split_dates: Some(SplitDates {
            train_end: iso(times[20]),
            validation_end: iso(times[34]),
        }),
        block_steps: 12,
        ..config()
    };
    let ranges = [
        (Split::Train, 0..20),
        (Split::Validation, 20..34),
        (Split::Test, 34..48),
    ];
    for (split, range) in ranges {
        let pipeline = Pipeline::new(dataset.clone(), dated(split), Some(stats.clone())).unwrap();
        for id in 0..pipeline.num_samples() {
            let sample = pipeline.sample(0, id).await.unwrap();
            for f in &sample.fields {
                let w = &f.window;
                assert!(
                    range.start <= w.time_start && w.time_start + w.size[0] <= range.end,
                    "{split:?} sample {id}: window {w:?} leaves {range:?}"
                );
            }
        }
    }
    let bad = PipelineConfig {
        split_dates: Some(SplitDates {
            train_end: "2021-13-01".into(),
            validation_end: iso(times[34]),
        }),
        ..config()
    };
    let err = Pipeline::new(dataset.clone(), bad, Some(stats.clone())).unwrap_err();
    assert!(err.to_string().contains("split_dates.train_end"), "{err}");
}

/// Tiles mode: every grid point of every time step in range is covered, tiles come in time
/// order, and fields with different windows are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiles_cover_the_globe_in_time_order() {
    use atmorep_loader::pipeline::SampleMode;

    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let (nlat, nlon) = (dataset.lats.len(), dataset.lons.len());
    let times = dataset.times.clone();
    let mut cfg = config();
    cfg.fields[1].num_tokens = cfg.fields[0].num_tokens;
    cfg.fields[1].mask = MaskSpec::None;
    cfg.fields[0].mask = MaskSpec::None;
    cfg.mode = SampleMode::Tiles {
        overlap: [0, 3, 6],
        time_start: Some(iso(times[3])),
        time_end: Some(iso(times[26])),
    };
    let pipeline = Pipeline::new(dataset.clone(), cfg.clone(), Some(stats.clone())).unwrap();
    let mut covered = vec![0u32; 24 * nlat * nlon];
    let mut last_start = 0;
    for id in 0..pipeline.num_samples() {
        let sample = pipeline.sample(0, id).await.unwrap();
        let w = sample.fields[0].window;
        assert_eq!(w, sample.fields[1].window, "fields share the tile");
        assert!(w.time_start >= last_start, "time order");
        last_start = w.time_start;
        assert!(sample.fields[0].masked_indices.is_empty());
        for t in w.time_start..w.time_start + w.size[0] {
            for y in w.lat_start..w.lat_start + w.size[1] {
                for x in 0..w.size[2] {
                    covered[((t - 3) * nlat + y) * nlon + (w.lon_start + x) % nlon] += 1;
                }
            }
        }
    }
    assert!(
        covered.iter().all(|&c| c >= 1),
        "every point of 3..=26 covered"
    );

    let mut mismatched = cfg;
    mismatched.fields[1].num_tokens = [4, 3, 4];
    let err = Pipeline::new(dataset, mismatched, Some(stats)).unwrap_err();
    assert!(
        matches!(&err, PipelineError::Field { field, .. } if field == "vo"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_by_centre_is_shifted_inside_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let pipeline = Pipeline::new(dataset.clone(), config(), Some(stats)).unwrap();
    let sample = pipeline.sample_at(0, 20, 90.0, 359.0).await.unwrap();
    let w = sample.fields[0].window;
    assert_eq!(w.lat_start, 0, "shifted inward at the north pole");
    assert_eq!(w.time_start, 20 - 6);
    assert!(
        pipeline.sample_at(0, 2, 0.0, 0.0).await.is_err(),
        "window before t=0"
    );
    assert!(pipeline.sample_at(0, 20, 91.0, 0.0).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_waiting_leaves_budget_for_the_next() {
    use atmorep_loader::pipeline::{BatchSpec, MemoryBudget};

    // One client reading two streams in turn (a trainer's tasks): while it reads the second,
    // the first's prefetched groups must not hold the whole shared budget.
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let pipeline = Arc::new(Pipeline::new(dataset, config(), Some(stats)).unwrap());
    let budget = MemoryBudget::new(8 * 4 * pipeline.sample_bytes());
    let spec = BatchSpec {
        rank: 0,
        world: 1,
        start: EpochCursor::start_of(0),
        end_epoch: None,
        batch_size: 4,
        sample_concurrency: 8,
        prefetch_batches: 2,
        memory: Some(budget.clone()),
    };
    let mut first = pipeline.batches(spec.clone()).unwrap();
    assert!(first.next().await.unwrap().is_ok());
    // Let the first stream prefetch all it may.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut second = pipeline.batches(spec).unwrap();
    for _ in 0..6 {
        let batch = tokio::time::timeout(std::time::Duration::from_secs(20), second.next())
            .await
            .expect("the second stream gets budget while the first waits")
            .unwrap()
            .unwrap();
        assert_eq!(batch.samples.len(), 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_pipeline_reports_each_epoch_against_its_own_decode_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, _) = store(dir.path()).await;
    let cfg = PipelineConfig {
        samples_per_block: 6,
        ..config()
    };
    let pipeline = Pipeline::new(dataset.clone(), cfg.clone(), None);
    // The bench computes the statistics it needs beside the store.
    assert!(pipeline.is_err(), "global normalization needs statistics");
    let url = dir.path().join("pipe.zarr");
    let reports = atmorep_loader::tools::bench_pipeline::run(
        url.to_str().unwrap(),
        cfg,
        None,
        1 << 30,
        None,
        3,
        8,
        atmorep_loader::tools::bench_pipeline::BlockReads::Both,
        atmorep_loader::tools::bench_pipeline::Cut::Both,
        true,
        &NoProgress,
    )
    .await
    .unwrap();
    // Each epoch four times: sample by sample, then in groups, each with whole chunks and then
    // block reads where they apply (nowhere here: chunks this small are read whole).
    assert_eq!(
        reports
            .iter()
            .map(|r| (r.epoch, r.group_cut, r.block_reads))
            .collect::<Vec<_>>(),
        [0, 1, 2]
            .map(|e| [
                (e, false, false),
                (e, false, true),
                (e, true, false),
                (e, true, true)
            ])
            .concat()
    );
    for r in &reports {
        assert!(r.fetched_bytes > 0 && r.fetch_requests > 0, "{r:?}");
        assert!(r.to_text().contains("fetched/delivered"), "{r:?}");
        // 38 training steps: two 16-step blocks, 6 samples each.
        assert_eq!(r.samples, 12, "epoch {}", r.epoch);
        // Every epoch starts from an empty cache, so each decodes (and is compared with
        // decoding) its own chunks.
        assert!(r.decode_seconds > 0.0 && r.decode_gbps > 0.0, "{r:?}");
        assert!(
            r.read_amplification > 0.5 && r.read_amplification < 20.0,
            "{r:?}"
        );
        let ratio = r.decode_seconds / r.seconds;
        assert!((r.ratio - ratio).abs() < 1e-12 && r.ratio > 0.0, "{r:?}");
        let resident = r.resident_seconds / r.seconds;
        assert!(
            (r.resident_ratio - resident).abs() < 1e-12 && r.resident_ratio > 0.0,
            "{r:?}"
        );
        assert!(r.to_text().contains("resident limit"), "{}", r.to_text());
        assert!(r.to_text().contains(&format!("epoch {}", r.epoch)));
    }
}

/// A regional grid (a CDS area subset: longitudes 100° … 188.75°, not once around the globe)
/// opens, but a pipeline on it is refused by name: every window and tile would wrap across its
/// edge as if it were periodic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regional_grid_is_refused_not_wrapped() {
    use zarrs::array::{Array, ArraySubset};
    let dir = tempfile::tempdir().unwrap();
    let (global, stats) = store(dir.path()).await;
    assert!(global.lon_periodic());
    let path = dir.path().join("pipe.zarr");
    let fs = Arc::new(zarrs::filesystem::FilesystemStore::new(&path).unwrap());
    let longitude = Array::open(fs, "/longitude").unwrap();
    let n = longitude.shape()[0];
    let regional: Vec<f64> = (0..n).map(|i| 100.0 + 1.25 * i as f64).collect();
    longitude
        .store_array_subset(&ArraySubset::new_with_shape(vec![n]), regional)
        .unwrap();
    let dataset = Arc::new(Dataset::open(path.to_str().unwrap()).await.unwrap());
    assert!(!dataset.lon_periodic());
    assert_eq!(dataset.lons[0], 100.0);
    let err = match Pipeline::new(dataset, config(), Some(stats)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a regional grid was served"),
    };
    assert!(
        err.contains("regional grid") && err.contains("100° … 188.75°"),
        "{err}"
    );
}

/// Encodings and blur run off the async worker: on a single-threaded runtime a ticker keeps
/// ticking while a sample with a wide window-dependent positional encoding and a blur is cut (run
/// on the worker, the ticker would stall for the whole computation).
#[tokio::test(flavor = "current_thread")]
async fn cpu_heavy_sample_work_leaves_the_async_worker_free() {
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let mut cfg = config();
    // 2 levels × 4 × 12 × 24 tokens, a global encoding 2048 wide: 9.4 M values per sample.
    cfg.fields.truncate(1);
    cfg.fields[0].num_tokens = [4, 12, 24];
    cfg.fields[0].pe = PeMode::Global;
    cfg.fields[0].pe_width = 2048;
    cfg.fields[0].blur_sigma = 1.5;
    let pipeline = Pipeline::new(dataset, cfg, Some(stats)).unwrap();
    // Warm the chunk cache, so that the measured sample is CPU work only.
    pipeline.sample(0, 0).await.unwrap();

    let (sample, took, widest) = longest_stall_during(pipeline.sample(0, 0)).await;
    let sample = sample.unwrap();
    assert_eq!(sample.fields[0].pe.len(), 2 * 4 * 12 * 24 * 2048);
    println!(
        "sample: {:.1} ms; the worker's longest stall meanwhile: {:.1} ms",
        took.as_secs_f64() * 1e3,
        widest.as_secs_f64() * 1e3
    );
    assert!(
        widest < took / 2,
        "the worker stalled {widest:?} during a {took:?} sample"
    );
}

/// Runs `work` on the current (single-threaded) runtime beside a 1 ms ticker: its output, how long
/// it took and the ticker's longest wait meanwhile (the worker's longest stall).
async fn longest_stall_during<T>(
    work: impl std::future::Future<Output = T>,
) -> (T, std::time::Duration, std::time::Duration) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut last = Instant::now();
            let mut widest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                widest = widest.max(last.elapsed());
                last = Instant::now();
            }
            widest
        }
    });
    tokio::task::yield_now().await;
    let start = Instant::now();
    let out = work.await;
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    (out, took, ticker.await.unwrap())
}

/// An epoch of two million samples: its order is built when the stream draws its first ids, off
/// the async worker.
#[tokio::test(flavor = "current_thread")]
async fn planning_a_large_epoch_leaves_the_async_worker_free() {
    use atmorep_loader::pipeline::BatchSpec;
    let dir = tempfile::tempdir().unwrap();
    let (dataset, stats) = store(dir.path()).await;
    let mut cfg = config();
    cfg.samples_per_block = 1_000_000;
    let pipeline = Arc::new(Pipeline::new(dataset, cfg, Some(stats)).unwrap());
    assert!(pipeline.num_samples() >= 2_000_000);
    let spec = BatchSpec {
        rank: 0,
        world: 1,
        start: EpochCursor::default(),
        end_epoch: None,
        batch_size: 1,
        sample_concurrency: 1,
        prefetch_batches: 1,
        memory: None,
    };
    // The stream starts inside the measured span: its task begins drawing ids at once.
    let (first, took, widest) = longest_stall_during(async {
        let mut batches = pipeline.batches(spec).unwrap();
        batches.next().await
    })
    .await;
    first.expect("a first batch").unwrap();
    println!(
        "first batch of a {}-sample epoch: {:.1} ms; the worker's longest stall meanwhile: \
         {:.1} ms",
        pipeline.num_samples(),
        took.as_secs_f64() * 1e3,
        widest.as_secs_f64() * 1e3
    );
    assert!(
        widest < took / 2,
        "the worker stalled {widest:?} while the first batch took {took:?}"
    );
}
