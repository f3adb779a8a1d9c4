//! `atmorep loader inspect`: what a store holds, how it is laid out and encoded, and (with
//! `--stats`) the moments of every variable from one full read.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use atmorep_proto::calendar::{TimeFormat, format_time};
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::pipeline::normalization::{Coverage, GLOBAL_FILE, GlobalStats, Moments};
use crate::progress::Progress;
use crate::store::dataset::{Dataset, Layout};

/// The report `inspect` prints (as text or JSON).
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub url: String,
    pub zarr_format: u8,
    pub consolidated: bool,
    pub layout: Layout,
    pub time: TimeAxis,
    pub grid: GridInfo,
    pub arrays: Vec<ArrayInfo>,
    pub variables: Vec<VariableInfo>,
    /// The global statistics folder beside a local store, and what it covers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statistics: Option<StatisticsInfo>,
}

/// A statistics folder and what its global statistics were computed from.
#[derive(Debug, Clone, Serialize)]
pub struct StatisticsInfo {
    pub folder: String,
    pub coverage: Option<Coverage>,
}

/// The time axis.
#[derive(Debug, Clone, Serialize)]
pub struct TimeAxis {
    pub steps: usize,
    pub start: String,
    pub end: String,
    /// Step in seconds when regular, else `None`.
    pub step_seconds: Option<i64>,
    pub units: String,
}

/// The horizontal grid.
#[derive(Debug, Clone, Serialize)]
pub struct GridInfo {
    pub nlat: usize,
    pub nlon: usize,
    /// Canonical first/last latitude (north→south).
    pub lat_first: f64,
    pub lat_last: f64,
    pub lon_first: f64,
    pub lon_last: f64,
    pub dlat: f64,
    pub dlon: f64,
    /// How the store orders latitude: `descending` (ERA5) or `ascending`.
    pub stored_latitude: String,
    /// `0..360` or `-180..180` (as stored).
    pub stored_longitude: String,
}

/// One Zarr array.
#[derive(Debug, Clone, Serialize)]
pub struct ArrayInfo {
    pub name: String,
    pub dims: Option<Vec<String>>,
    pub shape: Vec<u64>,
    pub chunks: Vec<u64>,
    pub dtype: String,
    pub codecs: Vec<String>,
    /// Bytes of the stored objects (None where the store cannot list, e.g. plain HTTP).
    pub compressed_bytes: Option<u64>,
    pub decoded_bytes: u64,
}

/// One variable of the canonical view.
#[derive(Debug, Clone, Serialize)]
pub struct VariableInfo {
    pub name: String,
    pub array: String,
    pub long_name: Option<String>,
    pub units: Option<String>,
    pub levels: Vec<f64>,
    pub stored_dtype: String,
    pub scale_factor: f64,
    pub add_offset: f64,
    pub missing_values: Vec<f64>,
    pub stats: Option<Moments>,
}

/// The global statistics folder `STORE.stats` beside a local store at `path`, if it holds a
/// table, with what the table covers.
pub fn statistics_beside(path: &std::path::Path) -> Option<StatisticsInfo> {
    let dir = GlobalStats::default_dir(path);
    let table = dir.join(GLOBAL_FILE);
    if !table.exists() {
        return None;
    }
    Some(StatisticsInfo {
        folder: dir.display().to_string(),
        coverage: GlobalStats::load(&table)
            .ok()
            .and_then(|s| s.coverage().cloned()),
    })
}

/// Builds the report; `stats` reads every variable fully, reporting the time steps read to
/// `progress`.
pub async fn inspect(
    dataset: &Dataset,
    stats: bool,
    progress: &dyn Progress,
) -> Result<InspectReport> {
    let mut arrays = Vec::new();
    for node in dataset.metadata.arrays.values() {
        let array = &node.array;
        let metadata = serde_json::to_value(array.metadata()).unwrap_or(Value::Null);
        let element = array.data_type().fixed_size().unwrap_or(0) as u64;
        arrays.push(ArrayInfo {
            name: node.name.clone(),
            dims: node.dims.clone(),
            shape: array.shape().to_vec(),
            chunks: array
                .chunk_shape(&vec![0; array.dimensionality()])
                .map(|s| s.iter().map(|n| n.get()).collect())
                .unwrap_or_default(),
            dtype: dtype_name(&metadata),
            codecs: codec_names(&metadata),
            compressed_bytes: stored_bytes(dataset, &node.name).await,
            decoded_bytes: array.shape().iter().product::<u64>() * element,
        });
    }
    let mut moments: BTreeMap<String, Moments> = BTreeMap::new();
    if stats {
        let steps: u64 = dataset.variables.len() as u64 * dataset.times.len() as u64;
        progress.start("stats", steps);
        let mut buffer = Vec::new();
        for variable in dataset.variables.values() {
            let mut acc = Moments::default();
            dataset
                .scan(variable, &mut buffer, progress, |_, values| {
                    acc = acc.merge(Moments::from_values(values));
                })
                .await?;
            moments.insert(variable.name.clone(), acc);
        }
        progress.finish();
    }
    let variables = dataset
        .variables
        .values()
        .map(|v| VariableInfo {
            name: v.name.clone(),
            array: v.node.name.clone(),
            long_name: v.long_name.clone(),
            units: v.units.clone(),
            levels: v.levels.clone(),
            stored_dtype: v.stored_dtype.clone(),
            scale_factor: v.packing.scale,
            add_offset: v.packing.offset,
            missing_values: v.packing.missing.clone(),
            stats: moments.get(&v.name).copied(),
        })
        .collect();
    let times = &dataset.times;
    let steps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let regular = steps
        .first()
        .copied()
        .filter(|s| steps.iter().all(|x| x == s));
    let (lats, lons) = (&dataset.lats, &dataset.lons);
    Ok(InspectReport {
        statistics: None,
        url: dataset.url().to_string(),
        zarr_format: dataset.metadata.zarr_format,
        consolidated: dataset.metadata.consolidated,
        layout: dataset.layout,
        time: TimeAxis {
            steps: times.len(),
            start: format_time(times[0], TimeFormat::Iso),
            end: format_time(times[times.len() - 1], TimeFormat::Iso),
            step_seconds: regular,
            units: dataset.time_units.clone(),
        },
        grid: GridInfo {
            nlat: lats.len(),
            nlon: lons.len(),
            lat_first: lats[0],
            lat_last: lats[lats.len() - 1],
            lon_first: lons[0],
            lon_last: lons[lons.len() - 1],
            dlat: (lats[0] - lats[lats.len() - 1]) / (lats.len() - 1) as f64,
            dlon: lons[1] - lons[0],
            stored_latitude: if dataset.lat_ascending {
                "ascending"
            } else {
                "descending"
            }
            .into(),
            stored_longitude: if dataset.lon_shift == 0 {
                "0..360"
            } else {
                "-180..180"
            }
            .into(),
        },
        arrays,
        variables,
    })
}

async fn stored_bytes(dataset: &Dataset, array: &str) -> Option<u64> {
    let prefix = dataset.location.path(array);
    let objects: Vec<_> = dataset
        .location
        .store()
        .list(Some(&prefix))
        .try_collect()
        .await
        .ok()?;
    Some(
        objects
            .iter()
            .filter(|o| {
                let name = o.location.filename().unwrap_or_default();
                !matches!(name, ".zarray" | ".zattrs" | "zarr.json")
            })
            .map(|o| o.size)
            .sum(),
    )
}

fn dtype_name(metadata: &Value) -> String {
    metadata
        .get("dtype")
        .or_else(|| metadata.get("data_type"))
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_default()
}

/// Short names of an array's codecs from its metadata JSON (e.g. `blosc-lz4-shuffle`).
pub(crate) fn codec_names(metadata: &Value) -> Vec<String> {
    fn describe(codec: &Value, out: &mut Vec<String>) {
        let name = codec
            .get("name")
            .or_else(|| codec.get("id"))
            .and_then(Value::as_str)
            .unwrap_or("?");
        let config = codec.get("configuration").unwrap_or(codec);
        match name {
            "bytes" | "transpose" => {}
            "sharding_indexed" => {
                let inner = config
                    .get("chunk_shape")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                out.push(format!("sharding(inner {inner})"));
                for c in config
                    .get("codecs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    describe(c, out);
                }
            }
            "blosc" => {
                let cname = config.get("cname").and_then(Value::as_str).unwrap_or("?");
                let shuffle = match config.get("shuffle") {
                    Some(Value::Number(n)) => match n.as_u64() {
                        Some(1) => "shuffle".to_string(),
                        Some(2) => "bitshuffle".to_string(),
                        _ => "noshuffle".to_string(),
                    },
                    Some(Value::String(s)) => s.clone(),
                    _ => "?".into(),
                };
                out.push(format!("blosc-{cname}-{shuffle}"));
            }
            other => match config.get("level") {
                Some(level) => out.push(format!("{other}(level {level})")),
                None => out.push(other.to_string()),
            },
        }
    }
    let mut out = Vec::new();
    if let Some(codecs) = metadata.get("codecs").and_then(Value::as_array) {
        for c in codecs {
            describe(c, &mut out);
        }
    } else {
        for f in metadata
            .get("filters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            describe(f, &mut out);
        }
        match metadata.get("compressor") {
            Some(Value::Null) | None => {}
            Some(c) => describe(c, &mut out),
        }
    }
    if out.is_empty() {
        out.push("none".into());
    }
    out
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

impl InspectReport {
    /// A human-readable rendering.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "store      {}", self.url);
        let _ = writeln!(
            s,
            "format     Zarr v{}{}, layout {:?}",
            self.zarr_format,
            if self.consolidated {
                " (consolidated)"
            } else {
                ""
            },
            self.layout
        );
        let step = self
            .time
            .step_seconds
            .map(|s| format!("{} h", s as f64 / 3600.0))
            .unwrap_or_else(|| "irregular".into());
        let _ = writeln!(
            s,
            "time       {} steps, {} → {}, step {}  [{}]",
            self.time.steps, self.time.start, self.time.end, step, self.time.units
        );
        let g = &self.grid;
        let _ = writeln!(
            s,
            "grid       {} × {} (lat {:.3}→{:.3}, Δ{:.4}°; lon {:.3}→{:.3}, Δ{:.4}°); stored latitude {}, longitude {}",
            g.nlat,
            g.nlon,
            g.lat_first,
            g.lat_last,
            g.dlat,
            g.lon_first,
            g.lon_last,
            g.dlon,
            g.stored_latitude,
            g.stored_longitude
        );
        if let Some(st) = &self.statistics {
            let _ = match &st.coverage {
                Some(c) => writeln!(s, "statistics {}: {c}", st.folder),
                None => writeln!(s, "statistics {}: coverage not recorded", st.folder),
            };
        }
        let _ = writeln!(s, "\narrays");
        let _ = writeln!(
            s,
            "  {:<14} {:<8} {:<46} {:<22} {:<28} {:>11} {:>11}",
            "name", "dtype", "dims × shape", "chunks", "codecs", "stored", "decoded"
        );
        for a in &self.arrays {
            let dims = match &a.dims {
                Some(d) => d
                    .iter()
                    .zip(&a.shape)
                    .map(|(d, n)| format!("{d}={n}"))
                    .collect::<Vec<_>>()
                    .join(","),
                None => format!("{:?}", a.shape),
            };
            let _ = writeln!(
                s,
                "  {:<14} {:<8} {:<46} {:<22} {:<28} {:>11} {:>11}",
                a.name,
                a.dtype,
                dims,
                format!("{:?}", a.chunks),
                a.codecs.join("+"),
                a.compressed_bytes.map(human).unwrap_or_else(|| "?".into()),
                human(a.decoded_bytes)
            );
        }
        let _ = writeln!(s, "\nvariables");
        for v in &self.variables {
            let levels = if v.levels.is_empty() {
                "surface".to_string()
            } else {
                v.levels
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let packing = if v.scale_factor != 1.0 || v.add_offset != 0.0 {
                format!(
                    " packed {}×{}+{}",
                    v.stored_dtype, v.scale_factor, v.add_offset
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "  {:<6} {:<28} [{}] levels {}{}",
                v.name,
                v.long_name.clone().unwrap_or_default(),
                v.units.clone().unwrap_or_default(),
                levels,
                packing
            );
            if let Some(m) = &v.stats {
                let _ = writeln!(
                    s,
                    "         count {} missing {} mean {:.6e} std {:.6e} min {:.6e} max {:.6e}",
                    m.count,
                    m.missing,
                    m.mean,
                    m.std(),
                    m.min,
                    m.max
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn codec_descriptions_cover_v2_and_v3() {
        let v2 =
            json!({"compressor": {"id": "blosc", "cname": "lz4", "shuffle": 1}, "filters": null});
        assert_eq!(codec_names(&v2), vec!["blosc-lz4-shuffle"]);
        let v3 = json!({"codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, 2], "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}]}}]});
        assert_eq!(
            codec_names(&v3),
            vec!["sharding(inner [1,2])", "zstd(level 3)"]
        );
        assert_eq!(codec_names(&json!({"compressor": null})), vec!["none"]);
    }
}
