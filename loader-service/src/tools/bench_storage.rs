//! `atmorep loader bench-storage`: how fast the storage under a store is, measured in one run so
//! the figures can be compared with each other — object GET throughput against concurrency,
//! single-core decode throughput per codec on a real chunk of the store, and hyperslab reads
//! (a time block of one level, and AtmoRep-sized sample windows). The headline figure is the
//! block read rate as a ratio to (single-core decode rate of the store's codec × cores).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{Float64Array, StringArray};
use arrow_schema::{DataType as ArrowType, Field, Schema};
use futures::{StreamExt, TryStreamExt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use zarrs::array::{Array, ArrayBytes, ArrayMetadata, ArrayMetadataV3, ArrayToBytesCodecTraits};

use crate::error::{Result, StoreError};
use crate::progress::Progress;
use crate::store::dataset::{Dataset, Role, Variable};
use crate::store::decode::{chunk_codec_options, run_on_rayon};
use crate::store::hyperslab::Hyperslab;
use crate::store::table::write_parquet;
use crate::store::zarr_meta::Codec;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub url: String,
    /// Folder for `bench-storage.parquet` and `bench-storage.png`.
    pub out: PathBuf,
    /// Variable to read (default: the first).
    pub variable: Option<String>,
    /// Time steps per block read.
    pub block: usize,
    /// Repetitions; the best is kept (the least disturbed by other load).
    pub repeats: usize,
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub section: String,
    pub name: String,
    /// The swept parameter (concurrency, window count…), 0 when none.
    pub x: f64,
    pub value: f64,
    pub unit: String,
}

/// All figures of one run.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub url: String,
    pub variable: String,
    pub cores: usize,
    pub rows: Vec<BenchRow>,
    /// Single-core decode rate of the store's own codec on its own chunk (GB/s decoded).
    pub store_decode_gbps: f64,
    /// Block hyperslab read rate, cold cache (GB/s delivered).
    pub block_read_gbps: f64,
    /// `block_read_gbps / (store_decode_gbps × cores)`.
    pub ratio: f64,
    pub parquet: PathBuf,
    /// Where the chart of the run belongs (the caller draws it from [`BenchReport::chart`]).
    pub png: PathBuf,
}

/// The figures a chart of the run shows: object GET throughput against requests in flight, and
/// the decode (one core) and hyperslab read rates as bars.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchChart {
    pub title: String,
    /// (requests in flight, GB/s encoded).
    pub get_throughput: Vec<(f64, f64)>,
    /// (label, GB/s of decoded values).
    pub rates: Vec<(String, f64)>,
}

const GB: f64 = 1e9;

/// Runs the benchmark, reporting its four sections to `progress`, and writes its table (the
/// caller draws the chart).
pub async fn run_bench(cfg: &BenchConfig, progress: &dyn Progress) -> Result<BenchReport> {
    let dataset = Arc::new(Dataset::open(&cfg.url).await?);
    let name = match &cfg.variable {
        Some(v) => v.clone(),
        None => dataset
            .variables
            .keys()
            .next()
            .cloned()
            .ok_or_else(|| StoreError::metadata(&cfg.url, "the store has no variables"))?,
    };
    let variable = dataset.variable(&name)?.clone();
    let cores = rayon::current_num_threads();
    let mut rows = Vec::new();
    progress.start("bench", 4);

    // Chunk keys of the block at level 0 (the objects a sampler would fetch).
    let block = cfg.block.min(dataset.times.len());
    let base = Hyperslab {
        time: 0..block,
        levels: if variable.has_level() {
            vec![0]
        } else {
            vec![]
        },
        ..Hyperslab::full(&dataset, &variable)
    };
    let keys = chunk_keys(&dataset, &variable, &base);

    // 1. GET throughput vs concurrency.
    for concurrency in [1usize, 2, 4, 8, 16, 32] {
        let mut best = 0.0f64;
        for _ in 0..cfg.repeats {
            let started = Instant::now();
            let bytes: u64 = futures::stream::iter(keys.iter())
                .map(|k| {
                    let dataset = dataset.clone();
                    async move {
                        Ok::<_, StoreError>(
                            dataset
                                .location()
                                .get(k)
                                .await?
                                .map_or(0, |b| b.len() as u64),
                        )
                    }
                })
                .buffer_unordered(concurrency)
                .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
                .await?;
            best = best.max(bytes as f64 / started.elapsed().as_secs_f64() / GB);
        }
        rows.push(row(
            "get",
            "object GET",
            concurrency as f64,
            best,
            "GB/s encoded",
        ));
    }
    progress.advance(1);

    // 2. Single-core decode per codec on a real decoded chunk.
    let first = keys
        .first()
        .ok_or_else(|| StoreError::metadata(&cfg.url, "the block touches no chunk"))?;
    let indices = first_chunk_indices(&variable);
    let encoded = dataset
        .location()
        .get(first)
        .await?
        .ok_or_else(|| StoreError::metadata(&cfg.url, format!("chunk `{first}` is missing")))?;
    let chunk = dataset.chunk(&variable, &indices).await?;
    let store_decode_gbps = {
        let node = variable.node.clone();
        let encoded = encoded.clone();
        let repeats = cfg.repeats;
        run_on_rayon(move || decode_rate(&node.array, &indices, &encoded, repeats)).await??
    };
    rows.push(row(
        "decode",
        &format!("store: {}", variable_codec(&variable)),
        1.0,
        store_decode_gbps,
        "GB/s decoded, 1 core",
    ));
    let shape: Vec<u64> = chunk.shape.iter().map(|&n| n as u64).collect();
    let values = chunk.values().to_vec();
    let repeats = cfg.repeats;
    let per_codec = run_on_rayon(move || -> Result<Vec<(String, f64, f64)>> {
        Codec::ALL
            .iter()
            .map(|codec| {
                let array = f32_array(&shape, *codec)?;
                let raw: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
                let chunk_shape = array
                    .chunk_shape(&vec![0; shape.len()])
                    .map_err(bench_err)?;
                let encoded = array
                    .codecs()
                    .encode(
                        ArrayBytes::new_flen(raw.as_slice()),
                        &chunk_shape,
                        array.data_type(),
                        array.fill_value(),
                        &chunk_codec_options(),
                    )
                    .map_err(bench_err)?
                    .into_owned();
                let ratio = raw.len() as f64 / encoded.len() as f64;
                let rate = decode_rate(&array, &vec![0; shape.len()], &encoded, repeats)?;
                Ok((codec.to_string(), rate, ratio))
            })
            .collect()
    })
    .await??;
    for (codec, rate, ratio) in &per_codec {
        rows.push(row("decode", codec, 1.0, *rate, "GB/s decoded, 1 core"));
        rows.push(row("compression", codec, 1.0, *ratio, "decoded/encoded"));
    }
    progress.advance(1);

    // 3. Block read: `block` steps × one level × full globe, cold cache.
    // Into one reused buffer, as a loader does; the first read also faults its pages in.
    let mut buffer = Vec::new();
    let mut block_read_gbps = 0.0f64;
    for _ in 0..=cfg.repeats {
        dataset.cache().clear();
        let started = Instant::now();
        buffer = dataset.read_into(&base, buffer).await?;
        block_read_gbps =
            block_read_gbps.max((buffer.len() * 4) as f64 / started.elapsed().as_secs_f64() / GB);
    }
    rows.push(row(
        "hyperslab",
        &format!("{block}-step block, 1 level, cold"),
        block as f64,
        block_read_gbps,
        "GB/s delivered",
    ));
    progress.advance(1);

    // 4. AtmoRep-sized sample windows (36 h × 54 × 108 points), cold and warm cache.
    let window = Hyperslab {
        time: 0..36.min(dataset.times.len()),
        lat: 0..54.min(dataset.lats.len()),
        lon_len: 108.min(dataset.lons.len()),
        ..base.clone()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let windows: Vec<Hyperslab> = (0..8)
        .map(|_| {
            let t0 = rng.random_range(0..=dataset.times.len() - window.time.len());
            let y0 = rng.random_range(0..=dataset.lats.len() - window.lat.len());
            Hyperslab {
                time: t0..t0 + window.time.len(),
                lat: y0..y0 + window.lat.len(),
                lon_start: rng.random_range(0..dataset.lons.len()),
                ..window.clone()
            }
        })
        .collect();
    for warm in [false, true] {
        let mut best = 0.0f64;
        let mut amplification = 0.0;
        for _ in 0..cfg.repeats {
            dataset.cache().clear();
            if warm {
                for w in &windows {
                    dataset.read(w).await?;
                }
            }
            let decoded_before = dataset
                .counters
                .decoded_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            let started = Instant::now();
            let mut delivered = 0usize;
            for w in &windows {
                if !warm {
                    dataset.cache().clear();
                }
                delivered += dataset.read(w).await?.len() * 4;
            }
            let rate = delivered as f64 / started.elapsed().as_secs_f64() / GB;
            let decoded = dataset
                .counters
                .decoded_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                - decoded_before;
            best = best.max(rate);
            amplification = decoded as f64 / delivered as f64;
        }
        let label = if warm { "warm" } else { "cold" };
        rows.push(row(
            "hyperslab",
            &format!("sample window 36×54×108, {label}"),
            8.0,
            best,
            "GB/s delivered",
        ));
        rows.push(row(
            "amplification",
            &format!("sample window, {label}"),
            8.0,
            amplification,
            "decoded/delivered",
        ));
    }
    progress.advance(1);
    progress.finish();

    let ratio = block_read_gbps / (store_decode_gbps * cores as f64);
    rows.push(row(
        "ratio",
        "block read / (store decode × cores)",
        cores as f64,
        ratio,
        "ratio",
    ));
    std::fs::create_dir_all(&cfg.out).map_err(|e| StoreError::io(&cfg.out, e))?;
    let parquet = cfg.out.join("bench-storage.parquet");
    write_table(&parquet, &rows)?;
    Ok(BenchReport {
        url: cfg.url.clone(),
        variable: name,
        cores,
        rows,
        store_decode_gbps,
        block_read_gbps,
        ratio,
        parquet,
        png: cfg.out.join("bench-storage.png"),
    })
}

fn row(section: &str, name: &str, x: f64, value: f64, unit: &str) -> BenchRow {
    BenchRow {
        section: section.into(),
        name: name.into(),
        x,
        value,
        unit: unit.into(),
    }
}

fn bench_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::metadata("bench-storage", e)
}

fn variable_codec(variable: &Variable) -> String {
    let meta = serde_json::to_value(variable.node.array.metadata()).unwrap_or_default();
    crate::tools::inspect::codec_names(&meta).join("+")
}

fn first_chunk_indices(variable: &Variable) -> Vec<u64> {
    variable
        .roles
        .iter()
        .map(|r| match r {
            Role::Field(f) => *f / variable.chunk_shape()[1].max(1),
            _ => 0,
        })
        .collect()
}

fn chunk_keys(dataset: &Dataset, variable: &Variable, slab: &Hyperslab) -> Vec<String> {
    let cs = variable.chunk_shape();
    let mut ranges: Vec<Vec<u64>> = Vec::new();
    for (axis, role) in variable.roles.iter().enumerate() {
        let c = cs[axis];
        let r: Vec<u64> = match *role {
            Role::Time => (slab.time.start as u64 / c..=(slab.time.end as u64 - 1) / c).collect(),
            Role::Level => vec![slab.levels.first().copied().unwrap_or(0) as u64 / c],
            Role::Field(f) => vec![f / c],
            Role::Lat => (0..(dataset.lats.len() as u64).div_ceil(c)).collect(),
            Role::Lon => (0..(dataset.lons.len() as u64).div_ceil(c)).collect(),
        };
        ranges.push(r);
    }
    let mut keys: Vec<Vec<u64>> = vec![Vec::new()];
    for r in ranges {
        keys = keys
            .into_iter()
            .flat_map(|k| r.iter().map(move |c| [k.clone(), vec![*c]].concat()))
            .collect();
    }
    keys.into_iter()
        .take(256)
        .map(|k| variable.node.array.chunk_key(&k).to_string())
        .collect()
}

/// Best-of-`repeats` single-threaded decode rate (GB/s of decoded bytes).
fn decode_rate<T: ?Sized>(
    array: &Array<T>,
    indices: &[u64],
    encoded: &[u8],
    repeats: usize,
) -> Result<f64> {
    let shape = array.chunk_shape(indices).map_err(bench_err)?;
    let options = chunk_codec_options();
    let mut best = 0.0f64;
    // Enough iterations that one measurement lasts well over a timer tick.
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        let mut bytes = 0usize;
        let mut iterations = 0;
        while iterations < 3 || started.elapsed().as_secs_f64() < 0.2 {
            let decoded = array
                .codecs()
                .decode(
                    std::borrow::Cow::Borrowed(encoded),
                    &shape,
                    array.data_type(),
                    array.fill_value(),
                    &options,
                )
                .map_err(bench_err)?;
            // An owned buffer, as a reader needs: for `none` this is the copy out of the
            // fetched bytes.
            let owned = decoded.into_fixed().map_err(bench_err)?.into_owned();
            bytes += owned.len();
            iterations += 1;
        }
        best = best.max(bytes as f64 / started.elapsed().as_secs_f64() / GB);
    }
    Ok(best)
}

/// A metadata-only f32 Zarr v3 array with one chunk of `shape` and `codec`.
fn f32_array(shape: &[u64], codec: Codec) -> Result<Array<()>> {
    let mut codecs = vec![json!({"name": "bytes", "configuration": {"endian": "little"}})];
    codecs.extend(codec.v3_codecs(4));
    let meta: ArrayMetadataV3 = serde_json::from_value(json!({
        "zarr_format": 3,
        "node_type": "array",
        "shape": shape,
        "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shape}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": "NaN",
        "codecs": codecs,
    }))
    .map_err(bench_err)?;
    Array::new_with_metadata(Arc::new(()), "/bench", ArrayMetadata::V3(meta)).map_err(bench_err)
}

fn write_table(path: &std::path::Path, rows: &[BenchRow]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("section", ArrowType::Utf8, false),
        Field::new("name", ArrowType::Utf8, false),
        Field::new("x", ArrowType::Float64, false),
        Field::new("value", ArrowType::Float64, false),
        Field::new("unit", ArrowType::Utf8, false),
    ]));
    write_parquet(
        path,
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.section.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.name.as_str()),
            )),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.x))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.unit.as_str()),
            )),
        ],
    )
}

impl BenchReport {
    /// What a chart of this run shows.
    pub fn chart(&self) -> BenchChart {
        BenchChart {
            title: format!(
                "bench-storage: {} ({}, {} cores)",
                self.url, self.variable, self.cores
            ),
            get_throughput: self
                .rows
                .iter()
                .filter(|r| r.section == "get")
                .map(|r| (r.x, r.value))
                .collect(),
            rates: self
                .rows
                .iter()
                .filter(|r| r.section == "decode" || r.section == "hyperslab")
                .map(|r| {
                    let label = if r.section == "decode" {
                        format!("decode {}", r.name)
                    } else {
                        r.name.clone()
                    };
                    (label, r.value)
                })
                .collect(),
        }
    }

    /// The table as text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "bench-storage {} (variable {}, {} cores)",
            self.url, self.variable, self.cores
        );
        let _ = writeln!(
            s,
            "  {:<14} {:<44} {:>8} {:>10}  unit",
            "section", "name", "x", "value"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "  {:<14} {:<44} {:>8} {:>10.3}  {}",
                r.section, r.name, r.x, r.value, r.unit
            );
        }
        let _ = writeln!(
            s,
            "\nblock read {:.3} GB/s ÷ (store decode {:.3} GB/s × {} cores) = {:.3}",
            self.block_read_gbps, self.store_decode_gbps, self.cores, self.ratio
        );
        let _ = writeln!(
            s,
            "table: {}\nplot:  {}",
            self.parquet.display(),
            self.png.display()
        );
        s
    }
}
