//! Round trips through real Zarr stores written by the synthetic generator: every format ×
//! layout × codec (and v3 sharding) must read back exactly what an uncompressed store holds on
//! disk, windows across the 0° seam and at both poles must equal slices of the full field, and
//! broken stores must fail naming the broken part.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::store::missing::MissingChunks;
use atmorep_loader::store::zarr_meta::{Codec, ZarrFormat};
use atmorep_loader::tools::synth::{SynthConfig, write_store};
use atmorep_loader::{ChunkCache, Dataset, Hyperslab, Layout, StoreError, StoreLocation};

const VARS: [&str; 2] = ["z", "vo"];

fn base_config() -> SynthConfig {
    SynthConfig {
        grid_deg: 10.0,
        steps: 6,
        step_hours: 6,
        levels: vec![850, 500],
        variables: VARS.iter().map(|v| v.to_string()).collect(),
        // Odd chunks so every axis has a partial edge chunk.
        chunks: Some([4, 1, 7, 10]),
        ..SynthConfig::default()
    }
}

fn write(dir: &Path, name: &str, cfg: &SynthConfig) -> PathBuf {
    let path = dir.join(name);
    write_store(cfg, &path, &NoProgress).expect("write synthetic store");
    path
}

/// The oracle: an uncompressed v2 store with one chunk per array holds each variable as raw
/// little-endian f32 in (time, level, lat, lon) order, which is the canonical order.
fn oracle(dir: &Path) -> Vec<Vec<f32>> {
    let cfg = SynthConfig {
        codec: Codec::None,
        chunks: Some([6, 2, 19, 36]),
        ..base_config()
    };
    let store = write(dir, "oracle.zarr", &cfg);
    VARS.iter()
        .map(|v| {
            let bytes = std::fs::read(store.join(v).join("0.0.0.0")).expect("raw chunk");
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect()
}

async fn read_all(path: &Path) -> Vec<Vec<f32>> {
    let dataset = Dataset::open(path.to_str().unwrap()).await.expect("open");
    let mut out = Vec::new();
    for v in VARS {
        let variable = dataset.variable(v).expect("variable");
        out.push(
            dataset
                .read(&Hyperslab::full(&dataset, variable))
                .await
                .expect("read"),
        );
    }
    out
}

fn assert_bitwise(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let bad = a
        .iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits());
    assert!(bad.is_none(), "{what}: first difference at {bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_layout_and_codec_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let expected = oracle(dir.path());
    let mut cases = Vec::new();
    for format in [ZarrFormat::V2, ZarrFormat::V3] {
        for layout in [Layout::PerVariable, Layout::Atmorep] {
            for codec in Codec::ALL {
                cases.push(SynthConfig {
                    format,
                    layout,
                    codec,
                    ..base_config()
                });
            }
            if format == ZarrFormat::V3 {
                for codec in [
                    Codec::Blosc {
                        zstd: false,
                        bitshuffle: false,
                    },
                    Codec::Zstd,
                ] {
                    cases.push(SynthConfig {
                        format,
                        layout,
                        codec,
                        chunks: Some([4, 2, 14, 36]),
                        shard_inner: Some([2, 1, 7, 12]),
                        ..base_config()
                    });
                }
            }
        }
    }
    for (i, cfg) in cases.iter().enumerate() {
        let what = format!(
            "{:?} {:?} {} shard {:?}",
            cfg.format, cfg.layout, cfg.codec, cfg.shard_inner
        );
        let path = write(dir.path(), &format!("case{i}.zarr"), cfg);
        let dataset = Dataset::open(path.to_str().unwrap()).await.expect(&what);
        assert_eq!(dataset.layout, cfg.layout, "{what}");
        assert_eq!(dataset.times.len(), 6);
        assert_eq!(dataset.lats.first(), Some(&90.0));
        assert_eq!(dataset.lons.len(), 36);
        let got = read_all(&path).await;
        for (k, v) in VARS.iter().enumerate() {
            assert_bitwise(&got[k], &expected[k], &format!("{what} {v}"));
        }
    }
}

/// Slices the full canonical field like a hyperslab would (wrapping longitude).
fn slice(full: &[f32], shape: [usize; 4], slab: &Hyperslab) -> Vec<f32> {
    let [_, nl, ny, nx] = shape;
    let mut out = Vec::new();
    for t in slab.time.clone() {
        for &l in &slab.levels {
            for y in slab.lat.clone() {
                for i in 0..slab.lon_len {
                    let x = (slab.lon_start + i) % nx;
                    out.push(full[((t * nl + l) * ny + y) * nx + x]);
                }
            }
        }
    }
    out
}

/// A plain v2 store and a sharded v3 AtmoRep-layout store with chunks that split every axis.
fn two_layouts(dir: &Path) -> [PathBuf; 2] {
    [
        write(dir, "v2.zarr", &base_config()),
        write(
            dir,
            "v3-atmorep-sharded.zarr",
            &SynthConfig {
                format: ZarrFormat::V3,
                layout: Layout::Atmorep,
                chunks: Some([4, 2, 14, 36]),
                shard_inner: Some([2, 1, 7, 12]),
                ..base_config()
            },
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_across_the_seam_and_at_the_poles_equal_slices_of_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let expected = oracle(dir.path());
    let stores = two_layouts(dir.path());
    let shape = [6, 2, 19, 36];
    let windows = [
        // across 0°/360°
        (1..5, vec![0, 1], 3..9, 33, 7),
        // north pole row, starting at the seam
        (0..3, vec![1], 0..3, 35, 36),
        // south pole
        (2..6, vec![0], 16..19, 10, 12),
        // single point on the seam
        (5..6, vec![1], 9..10, 35, 2),
        // one level, full globe
        (0..6, vec![1], 0..19, 0, 36),
    ];
    for store in &stores {
        let dataset = Dataset::open(store.to_str().unwrap()).await.unwrap();
        for (k, v) in VARS.iter().enumerate() {
            for (time, levels, lat, lon_start, lon_len) in windows.clone() {
                let slab = Hyperslab {
                    variable: v.to_string(),
                    time,
                    levels,
                    lat,
                    lon_start,
                    lon_len,
                };
                let got = dataset.read(&slab).await.unwrap();
                assert_eq!(got.len(), slab.len());
                assert_bitwise(
                    &got,
                    &slice(&expected[k], shape, &slab),
                    &format!("{store:?} {slab:?}"),
                );
            }
        }
    }
}

/// Cutting a window straight into token order (with a per-plane affine map on the way) equals
/// tokenizing the canonical read and mapping it afterwards, on every layout and with chunks that
/// split the window on every axis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_order_reads_equal_tokenized_windows() {
    use atmorep_loader::store::hyperslab::OutputLayout;
    use atmorep_proto::tokenize::tokenize;
    use atmorep_proto::{FieldGeometry, TokenGeometry};

    let dir = tempfile::tempdir().unwrap();
    let stores = two_layouts(dir.path());
    let geometry = FieldGeometry::new(vec![0, 1], TokenGeometry::new([2, 2, 3], [2, 3, 4]));
    let layout = OutputLayout::tokens(&geometry);
    // Across the seam, touching the north pole.
    let slab = Hyperslab {
        variable: "z".into(),
        time: 1..5,
        levels: vec![1, 0],
        lat: 0..6,
        lon_start: 30,
        lon_len: 12,
    };
    let planes = 4 * 2;
    let affine: Vec<(f32, f32)> = (0..planes)
        .map(|p| (1000.0 * p as f32, 1.0 / (1.0 + p as f32)))
        .collect();
    for store in &stores {
        let dataset = Dataset::open(store.to_str().unwrap()).await.unwrap();
        let window = dataset.read(&slab).await.unwrap();
        let got = dataset
            .read_layout_into(&slab, &layout, None, Vec::new())
            .await
            .unwrap();
        assert_bitwise(&got, &tokenize(&geometry, &window), &format!("{store:?}"));

        let mut mapped = window.clone();
        for (p, plane) in mapped.chunks_mut(6 * 12).enumerate() {
            let (offset, scale) = affine[p];
            for v in plane {
                *v = (*v - offset) * scale;
            }
        }
        let got = dataset
            .read_layout_into(&slab, &layout, Some(&affine), Vec::new())
            .await
            .unwrap();
        assert_bitwise(
            &got,
            &tokenize(&geometry, &mapped),
            &format!("{store:?} affine"),
        );

        let wrong = OutputLayout::tokens(&FieldGeometry::new(
            vec![0],
            TokenGeometry::new([2, 2, 3], [2, 3, 4]),
        ));
        let err = dataset
            .read_layout_into(&slab, &wrong, None, Vec::new())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("does not match the window"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_is_named_and_only_its_reads_fail() {
    let dir = tempfile::tempdir().unwrap();
    let expected = oracle(dir.path());
    let path = write(dir.path(), "broken.zarr", &base_config());
    std::fs::write(path.join("vo").join("0.0.0.0"), b"definitely not blosc").unwrap();
    let dataset = Dataset::open(path.to_str().unwrap()).await.unwrap();
    let touching = Hyperslab {
        variable: "vo".into(),
        time: 0..2,
        levels: vec![0],
        lat: 0..3,
        lon_start: 0,
        lon_len: 4,
    };
    let err = dataset.read(&touching).await.unwrap_err();
    assert!(matches!(err, StoreError::CorruptChunk { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("vo/0.0.0.0"), "{message}");
    // The same dataset keeps serving everything else, including other chunks of `vo`.
    let elsewhere = Hyperslab {
        lat: 10..19,
        ..touching.clone()
    };
    let got = dataset.read(&elsewhere).await.unwrap();
    assert_bitwise(
        &got,
        &slice(&expected[1], [6, 2, 19, 36], &elsewhere),
        "vo elsewhere",
    );
    let z = dataset.variable("z").unwrap();
    let z_all = dataset.read(&Hyperslab::full(&dataset, z)).await.unwrap();
    assert_bitwise(&z_all, &expected[0], "z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_chunk_reads_as_the_fill_value() {
    let dir = tempfile::tempdir().unwrap();
    let expected = oracle(dir.path());
    let path = write(dir.path(), "holes.zarr", &base_config());
    // Chunk (1, 0, 0, 0) covers times 4..6, level 0, lats 0..7, lons 0..10.
    std::fs::remove_file(path.join("z").join("1.0.0.0")).unwrap();
    let dataset = Dataset::open(path.to_str().unwrap()).await.unwrap();
    let z = dataset.variable("z").unwrap();
    let got = dataset.read(&Hyperslab::full(&dataset, z)).await.unwrap();
    for t in 0..6 {
        for l in 0..2 {
            for y in 0..19 {
                for x in 0..36 {
                    let i = ((t * 2 + l) * 19 + y) * 36 + x;
                    let hole = t >= 4 && l == 0 && y < 7 && x < 10;
                    if hole {
                        assert!(got[i].is_nan(), "({t},{l},{y},{x}) should be fill");
                    } else {
                        assert_eq!(got[i].to_bits(), expected[0][i].to_bits());
                    }
                }
            }
        }
    }
    assert_eq!(dataset.missing_chunks_reported(), 1);

    // The same store under `missing_chunks = "error"`, sharing a cache with a `fill` reader that
    // has just cached the fill values of the missing chunk: its reads of that chunk still fail,
    // naming it; reads elsewhere succeed.
    let cache = Arc::new(ChunkCache::new(64 << 20));
    let open = |name: &'static str, mode: MissingChunks| {
        let (path, cache) = (path.clone(), cache.clone());
        async move {
            let location = StoreLocation::open(path.to_str().unwrap()).unwrap();
            let mut dataset = Dataset::open_location(location, cache).await.unwrap();
            dataset.set_missing_chunks(name, mode);
            dataset
        }
    };
    let fill = open("fill", MissingChunks::Fill).await;
    let strict = open("strict", MissingChunks::Error).await;
    let z = fill.variable("z").unwrap();
    assert!(fill.read(&Hyperslab::full(&fill, z)).await.is_ok());
    let err = strict
        .read(&Hyperslab::full(&strict, strict.variable("z").unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::MissingChunk { .. }), "{err}");
    let text = err.to_string();
    for part in ["`strict`", "`z/1.0.0.0`", "array `z`"] {
        assert!(text.contains(part), "{text} names {part}");
    }
    let vo = strict.variable("vo").unwrap();
    assert!(strict.read(&Hyperslab::full(&strict, vo)).await.is_ok());
}

/// A store rewritten under an open dataset: a changed chunk read again from storage fails with
/// `StoreChanged` naming it, and the first change drops the dataset's cached chunks, so a chunk
/// rewritten while cached fails too on its next read instead of serving its old values beside
/// the new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_store_fails_its_changed_chunks_and_drops_their_cached_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "changing.zarr", &base_config());
    let url = path.to_str().unwrap();
    // A cache that holds all of `z` and nothing more.
    let z_bytes = {
        let dataset = Dataset::open(url).await.unwrap();
        let z = dataset.variable("z").unwrap();
        dataset.read(&Hyperslab::full(&dataset, z)).await.unwrap();
        dataset.cache().stats().resident_bytes
    };
    let cache = Arc::new(ChunkCache::new(z_bytes));
    let dataset = Dataset::open_location(StoreLocation::open(url).unwrap(), cache.clone())
        .await
        .unwrap();
    let full = |name: &str| Hyperslab::full(&dataset, dataset.variable(name).unwrap());
    // `vo` read (its versions recorded) then evicted by `z`, which stays cached.
    let vo_before = dataset.read(&full("vo")).await.unwrap();
    let z_before = dataset.read(&full("z")).await.unwrap();
    assert_eq!(cache.stats().resident_bytes, z_bytes);

    // Level 0's first chunk of each variable gets level 1's bytes, with a new time.
    for v in VARS {
        let (from, to) = (path.join(v).join("0.1.0.0"), path.join(v).join("0.0.0.0"));
        std::fs::copy(&from, &to).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&to)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000))
            .unwrap();
    }
    // `z` is cached: served as first read, unchanged (a change is seen when read from storage).
    assert_bitwise(
        &dataset.read(&full("z")).await.unwrap(),
        &z_before,
        "cached z",
    );
    assert!(!dataset.store_changed_seen());

    // `vo` is read from storage: the change is seen and named.
    let err = dataset.read(&full("vo")).await.unwrap_err();
    assert!(matches!(err, StoreError::StoreChanged { .. }), "{err}");
    let text = err.to_string();
    for part in ["store changed", "`vo/0.0.0.0`", "array `vo`"] {
        assert!(text.contains(part), "{text} names {part}");
    }
    assert!(dataset.store_changed_seen());
    // The old `z` values were dropped with the change: `z`'s rewritten chunk now fails too.
    let err = dataset.read(&full("z")).await.unwrap_err();
    assert!(
        err.to_string().contains("`z/0.0.0.0`"),
        "z's rewritten chunk is refused, not served from the cache: {err}"
    );
    // Chunks that did not change still read as before.
    let mut elsewhere = full("vo");
    elsewhere.levels = vec![1];
    let got = dataset.read(&elsewhere).await.unwrap();
    assert_bitwise(
        &got,
        &slice(&vo_before, [6, 2, 19, 36], &elsewhere),
        "vo level 1",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_codec_and_bad_requests_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "codec.zarr", &base_config());
    let zmeta = path.join(".zmetadata");
    let text = std::fs::read_to_string(&zmeta).unwrap();
    let patched = text.replacen("\"blosc\"", "\"lzma9000\"", 1);
    assert_ne!(text, patched);
    std::fs::write(&zmeta, patched).unwrap();
    let err = Dataset::open(path.to_str().unwrap()).await.unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedCodec { .. }), "{err}");
    assert!(err.to_string().contains("codec.zarr/"), "{err}");

    let good = write(dir.path(), "good.zarr", &base_config());
    let dataset = Dataset::open(good.to_str().unwrap()).await.unwrap();
    let err = dataset.variable("msl").unwrap_err();
    assert!(
        err.to_string().contains("msl") && err.to_string().contains("vo"),
        "{err}"
    );
    let vo = dataset.variable("vo").unwrap();
    for bad in [
        Hyperslab {
            time: 3..9,
            ..Hyperslab::full(&dataset, vo)
        },
        Hyperslab {
            levels: vec![2],
            ..Hyperslab::full(&dataset, vo)
        },
        Hyperslab {
            lat: 5..5,
            ..Hyperslab::full(&dataset, vo)
        },
        Hyperslab {
            lon_len: 37,
            ..Hyperslab::full(&dataset, vo)
        },
    ] {
        let err = dataset.read(&bad).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidHyperslab { .. }), "{err}");
    }
    let err = Dataset::open(dir.path().join("nothing-here").to_str().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing-here"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_cache_stays_within_budget_and_serves_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "cache.zarr", &base_config());
    // Four chunks of 4×1×7×10 f32 fit; the full read touches 2×2×3×4 = 48 per variable.
    let budget = 4 * 4 * 7 * 10 * 4;
    let cache = Arc::new(ChunkCache::new(budget));
    let location = StoreLocation::open(path.to_str().unwrap()).unwrap();
    let dataset = Dataset::open_location(location, cache.clone())
        .await
        .unwrap();
    let vo = dataset.variable("vo").unwrap();
    dataset.read(&Hyperslab::full(&dataset, vo)).await.unwrap();
    let stats = cache.stats();
    assert!(stats.resident_bytes <= budget, "{stats:?}");
    assert!(stats.evictions > 0);
    let window = Hyperslab {
        time: 0..2,
        levels: vec![0],
        lat: 0..3,
        lon_start: 0,
        lon_len: 4,
        variable: "vo".into(),
    };
    let first = dataset.read(&window).await.unwrap();
    let hits_before = cache.stats().hits;
    let second = dataset.read(&window).await.unwrap();
    assert_eq!(cache.stats().hits, hits_before + 1);
    assert_bitwise(&first, &second, "cached read");
}
