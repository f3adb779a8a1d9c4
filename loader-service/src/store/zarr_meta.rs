//! Zarr metadata for the stores this crate writes (synthetic stores, inference output, local
//! statistics): the format version and chunk codec, array metadata in v2 or v3 (optionally
//! sharded), arrays created from it on the local filesystem, and the root group, with
//! consolidated `.zmetadata` for v2 like xarray writes.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::{Value, json};
use zarrs::array::{Array, ArrayMetadata, ArrayMetadataV2, ArrayMetadataV3};
use zarrs::filesystem::FilesystemStore;

use crate::error::{Result, StoreError};

/// Zarr format version to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZarrFormat {
    V2,
    V3,
}

impl FromStr for ZarrFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "2" | "v2" => Ok(Self::V2),
            "3" | "v3" => Ok(Self::V3),
            _ => Err(format!("zarr format `{s}`: expected 2 or 3")),
        }
    }
}

/// Chunk compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Blosc with lz4 or zstd; `bitshuffle` selects bit- instead of byte-shuffle.
    Blosc {
        zstd: bool,
        bitshuffle: bool,
    },
    Zstd,
    Gzip,
    None,
}

impl FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "blosc-lz4" | "blosc" => Self::Blosc {
                zstd: false,
                bitshuffle: false,
            },
            "blosc-lz4-bitshuffle" => Self::Blosc {
                zstd: false,
                bitshuffle: true,
            },
            "blosc-zstd" => Self::Blosc {
                zstd: true,
                bitshuffle: false,
            },
            "blosc-zstd-bitshuffle" => Self::Blosc {
                zstd: true,
                bitshuffle: true,
            },
            "zstd" => Self::Zstd,
            "gzip" => Self::Gzip,
            "none" => Self::None,
            _ => {
                return Err(format!(
                    "codec `{s}`: expected blosc-lz4, blosc-lz4-bitshuffle, blosc-zstd, \
                     blosc-zstd-bitshuffle, zstd, gzip or none"
                ));
            }
        })
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Blosc { zstd, bitshuffle } => write!(
                f,
                "blosc-{}{}",
                if *zstd { "zstd" } else { "lz4" },
                if *bitshuffle { "-bitshuffle" } else { "" }
            ),
            Self::Zstd => f.write_str("zstd"),
            Self::Gzip => f.write_str("gzip"),
            Self::None => f.write_str("none"),
        }
    }
}

impl Codec {
    /// All codecs, for round-trip tests and benchmarks.
    pub const ALL: [Codec; 7] = [
        Codec::Blosc {
            zstd: false,
            bitshuffle: false,
        },
        Codec::Blosc {
            zstd: false,
            bitshuffle: true,
        },
        Codec::Blosc {
            zstd: true,
            bitshuffle: false,
        },
        Codec::Blosc {
            zstd: true,
            bitshuffle: true,
        },
        Codec::Zstd,
        Codec::Gzip,
        Codec::None,
    ];

    /// The numcodecs compressor JSON of a Zarr v2 `.zarray`.
    pub fn v2_compressor(&self, typesize: usize) -> Value {
        let _ = typesize;
        match self {
            Self::Blosc { zstd, bitshuffle } => json!({
                "id": "blosc",
                "cname": if *zstd { "zstd" } else { "lz4" },
                "clevel": 5,
                "shuffle": if *bitshuffle { 2 } else { 1 },
                "blocksize": 0
            }),
            Self::Zstd => json!({"id": "zstd", "level": 3}),
            Self::Gzip => json!({"id": "gzip", "level": 5}),
            Self::None => Value::Null,
        }
    }

    /// The bytes-to-bytes codecs of a Zarr v3 codec chain.
    pub fn v3_codecs(&self, typesize: usize) -> Vec<Value> {
        match self {
            Self::Blosc { zstd, bitshuffle } => vec![json!({
                "name": "blosc",
                "configuration": {
                    "cname": if *zstd { "zstd" } else { "lz4" },
                    "clevel": 5,
                    "shuffle": if *bitshuffle { "bitshuffle" } else { "shuffle" },
                    "typesize": typesize,
                    "blocksize": 0
                }
            })],
            Self::Zstd => {
                vec![json!({"name": "zstd", "configuration": {"level": 3, "checksum": false}})]
            }
            Self::Gzip => vec![json!({"name": "gzip", "configuration": {"level": 5}})],
            Self::None => vec![],
        }
    }
}

/// A write of the store at `path` failed.
pub(crate) fn write_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Write {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Creates array `name` under `store` from its metadata JSON and writes that metadata; one path
/// for v2 and v3.
pub(crate) fn array_from_json(
    store: &Arc<FilesystemStore>,
    out: &Path,
    name: &str,
    format: ZarrFormat,
    meta: Value,
) -> Result<Array<FilesystemStore>> {
    let metadata = match format {
        ZarrFormat::V2 => ArrayMetadata::V2(
            serde_json::from_value::<ArrayMetadataV2>(meta).map_err(|e| write_err(out, e))?,
        ),
        ZarrFormat::V3 => ArrayMetadata::V3(
            serde_json::from_value::<ArrayMetadataV3>(meta).map_err(|e| write_err(out, e))?,
        ),
    };
    let array = Array::new_with_metadata(store.clone(), &format!("/{name}"), metadata)
        .map_err(|e| write_err(out, e))?;
    array.store_metadata().map_err(|e| write_err(out, e))?;
    Ok(array)
}

/// One array to write: its name, shape, chunking (`shard_inner`: the inner chunks of v3
/// shards), element type (`f32`, `f64`, `i32` or `i64`), dimension names, codec and attributes.
pub(crate) struct ArraySpec<'a> {
    pub(crate) name: &'a str,
    pub(crate) shape: Vec<u64>,
    pub(crate) chunks: Vec<u64>,
    pub(crate) shard_inner: Option<Vec<u64>>,
    pub(crate) dtype: &'a str,
    pub(crate) dims: Vec<&'a str>,
    pub(crate) codec: Codec,
    pub(crate) attributes: serde_json::Map<String, Value>,
}

impl<'a> ArraySpec<'a> {
    /// A coordinate: `n` values along the dimension of the same name, in one uncompressed chunk.
    pub(crate) fn coordinate(
        name: &'a str,
        n: usize,
        dtype: &'a str,
        attributes: serde_json::Map<String, Value>,
    ) -> Self {
        Self {
            name,
            shape: vec![n as u64],
            chunks: vec![n as u64],
            shard_inner: None,
            dtype,
            dims: vec![name],
            codec: Codec::None,
            attributes,
        }
    }
}

/// The array's metadata document in `format` (`.zarray` with its attributes for v2,
/// `zarr.json` for v3).
pub(crate) fn metadata_json(format: ZarrFormat, spec: &ArraySpec<'_>) -> Value {
    let (v2_dtype, v3_dtype, size, fill) = match spec.dtype {
        "f32" => ("<f4", "float32", 4, json!("NaN")),
        "f64" => ("<f8", "float64", 8, json!("NaN")),
        "i32" => ("<i4", "int32", 4, json!(0)),
        _ => ("<i8", "int64", 8, json!(0)),
    };
    match format {
        ZarrFormat::V2 => {
            let mut attrs = spec.attributes.clone();
            attrs.insert("_ARRAY_DIMENSIONS".into(), json!(spec.dims));
            json!({
                "zarr_format": 2,
                "shape": spec.shape,
                "chunks": spec.chunks,
                "dtype": v2_dtype,
                "compressor": spec.codec.v2_compressor(size),
                "fill_value": fill,
                "order": "C",
                "filters": null,
                "dimension_separator": ".",
                "attributes": attrs,
            })
        }
        ZarrFormat::V3 => {
            let mut inner = vec![json!({"name": "bytes", "configuration": {"endian": "little"}})];
            inner.extend(spec.codec.v3_codecs(size));
            let codecs = match &spec.shard_inner {
                Some(chunk_shape) => vec![json!({
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": chunk_shape,
                        "codecs": inner,
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"}
                        ],
                        "index_location": "end"
                    }
                })],
                None => inner,
            };
            json!({
                "zarr_format": 3,
                "node_type": "array",
                "shape": spec.shape,
                "data_type": v3_dtype,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": spec.chunks}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": fill,
                "codecs": codecs,
                "dimension_names": spec.dims,
                "attributes": spec.attributes,
            })
        }
    }
}

/// Attributes from (key, value) pairs.
pub(crate) fn attrs(pairs: &[(&str, Value)]) -> serde_json::Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Creates the array of `spec` under `store` with its metadata and records that metadata in
/// `written` for the group's consolidated metadata.
pub(crate) fn write_array_meta(
    written: &mut Vec<(String, Value)>,
    store: &Arc<FilesystemStore>,
    out: &Path,
    format: ZarrFormat,
    spec: &ArraySpec<'_>,
) -> Result<Array<FilesystemStore>> {
    let meta = metadata_json(format, spec);
    let array = array_from_json(store, out, spec.name, format, meta.clone())?;
    written.push((spec.name.to_string(), meta));
    Ok(array)
}

/// Group metadata at `out`; in v2 with consolidated `.zmetadata` of `arrays` (their metadata as
/// [`metadata_json`] made it), like xarray writes at a store's root.
pub(crate) fn write_group(
    format: ZarrFormat,
    out: &Path,
    root_attrs: &serde_json::Map<String, Value>,
    arrays: &[(String, Value)],
) -> Result<()> {
    let put = |name: &str, value: &Value| {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
        std::fs::write(&path, text).map_err(|e| StoreError::io(&path, e))
    };
    match format {
        ZarrFormat::V2 => {
            put(".zgroup", &json!({"zarr_format": 2}))?;
            put(".zattrs", &Value::Object(root_attrs.clone()))?;
            let mut entries = serde_json::Map::new();
            entries.insert(".zgroup".into(), json!({"zarr_format": 2}));
            entries.insert(".zattrs".into(), Value::Object(root_attrs.clone()));
            for (name, meta) in arrays {
                let mut zarray = meta.clone();
                let attributes = zarray
                    .as_object_mut()
                    .and_then(|o| o.remove("attributes"))
                    .unwrap_or_else(|| json!({}));
                entries.insert(format!("{name}/.zarray"), zarray);
                entries.insert(format!("{name}/.zattrs"), attributes);
            }
            put(
                ".zmetadata",
                &json!({"metadata": entries, "zarr_consolidated_format": 1}),
            )
        }
        ZarrFormat::V3 => put(
            "zarr.json",
            &json!({"zarr_format": 3, "node_type": "group", "attributes": root_attrs}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_parse_and_print_round_trip() {
        for c in Codec::ALL {
            assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
        }
        assert!("lzma".parse::<Codec>().is_err());
    }
}
