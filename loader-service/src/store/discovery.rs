//! Metadata discovery: finds every array of a store (Zarr v2 consolidated or not, Zarr v3 with or
//! without inline consolidated metadata) and its attributes, reading as few objects as the
//! format allows. `zarrs` does not read v2 `.zmetadata` itself, so this module parses it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};
use zarrs::array::{Array, ArrayCreateError, ArrayMetadata, ArrayMetadataV2, ArrayMetadataV3};

use crate::error::{Result, StoreError};
use crate::store::location::StoreLocation;

/// A metadata-only Zarr array: codecs, chunk grid and attributes, no storage attached. All I/O
/// goes through [`StoreLocation`] so that fetching and decoding can be scheduled separately.
pub type MetaArray = Array<()>;

/// One array found in a store.
#[derive(Debug, Clone)]
pub struct ArrayNode {
    /// Path of the array relative to the store root (e.g. `t` or `normalization/t`).
    pub name: String,
    /// Dimension names from `dimension_names` (v3) or `_ARRAY_DIMENSIONS` (v2).
    pub dims: Option<Vec<String>>,
    /// The array's user attributes.
    pub attributes: Map<String, Value>,
    /// The zarrs array (metadata and codec chain).
    pub array: Arc<MetaArray>,
}

/// Everything discovered about a store's structure.
#[derive(Debug, Clone)]
pub struct StoreMetadata {
    /// 2 or 3.
    pub zarr_format: u8,
    /// Whether consolidated metadata was used.
    pub consolidated: bool,
    /// Root group attributes.
    pub attributes: Map<String, Value>,
    /// Arrays by path.
    pub arrays: BTreeMap<String, ArrayNode>,
}

/// Discovers the arrays of the store at `location`.
pub async fn discover(location: &StoreLocation) -> Result<StoreMetadata> {
    if let Some(bytes) = location.get(".zmetadata").await? {
        return from_consolidated_v2(location, &parse_json(location, ".zmetadata", &bytes)?);
    }
    if let Some(bytes) = location.get("zarr.json").await? {
        return discover_v3(location, parse_json(location, "zarr.json", &bytes)?).await;
    }
    if let Some(bytes) = location.get(".zgroup").await? {
        parse_json(location, ".zgroup", &bytes)?;
        return discover_v2(location).await;
    }
    Err(StoreError::NotAZarrStore {
        url: location.url().to_string(),
    })
}

fn parse_json(location: &StoreLocation, key: &str, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::metadata(format!("{}/{key}", location.url()), e))
}

fn from_consolidated_v2(location: &StoreLocation, zmeta: &Value) -> Result<StoreMetadata> {
    let path = format!("{}/.zmetadata", location.url());
    let entries = zmeta
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or_else(|| StoreError::metadata(&path, "no `metadata` object"))?;
    let attributes = entries
        .get(".zattrs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut arrays = BTreeMap::new();
    for (key, zarray) in entries {
        let Some(name) = key.strip_suffix("/.zarray") else {
            continue;
        };
        let attrs = entries
            .get(&format!("{name}/.zattrs"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        arrays.insert(name.to_string(), node_v2(location, name, zarray, attrs)?);
    }
    Ok(StoreMetadata {
        zarr_format: 2,
        consolidated: true,
        attributes,
        arrays,
    })
}

async fn discover_v2(location: &StoreLocation) -> Result<StoreMetadata> {
    let attributes = match location.get(".zattrs").await? {
        Some(b) => as_object(parse_json(location, ".zattrs", &b)?),
        None => Map::new(),
    };
    let mut arrays = BTreeMap::new();
    let mut pending: Vec<String> = location.list_children("").await?;
    while let Some(name) = pending.pop() {
        if let Some(bytes) = location.get(&format!("{name}/.zarray")).await? {
            let zarray = parse_json(location, &format!("{name}/.zarray"), &bytes)?;
            let attrs = match location.get(&format!("{name}/.zattrs")).await? {
                Some(b) => as_object(parse_json(location, &format!("{name}/.zattrs"), &b)?),
                None => Map::new(),
            };
            arrays.insert(name.clone(), node_v2(location, &name, &zarray, attrs)?);
        } else if location.get(&format!("{name}/.zgroup")).await?.is_some() {
            for child in location.list_children(&name).await? {
                pending.push(format!("{name}/{child}"));
            }
        }
    }
    Ok(StoreMetadata {
        zarr_format: 2,
        consolidated: false,
        attributes,
        arrays,
    })
}

async fn discover_v3(location: &StoreLocation, root: Value) -> Result<StoreMetadata> {
    let path = format!("{}/zarr.json", location.url());
    if root.get("node_type").and_then(Value::as_str) != Some("group") {
        return Err(StoreError::metadata(path, "the root is not a Zarr group"));
    }
    let attributes = root
        .get("attributes")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut arrays = BTreeMap::new();
    let consolidated = root
        .get("consolidated_metadata")
        .and_then(|c| c.get("metadata"))
        .and_then(Value::as_object);
    if let Some(entries) = consolidated {
        for (name, meta) in entries {
            if meta.get("node_type").and_then(Value::as_str) == Some("array") {
                arrays.insert(name.clone(), node_v3(location, name, meta.clone())?);
            }
        }
        return Ok(StoreMetadata {
            zarr_format: 3,
            consolidated: true,
            attributes,
            arrays,
        });
    }
    let mut pending: Vec<String> = location.list_children("").await?;
    while let Some(name) = pending.pop() {
        let key = format!("{name}/zarr.json");
        let Some(bytes) = location.get(&key).await? else {
            continue;
        };
        let meta = parse_json(location, &key, &bytes)?;
        match meta.get("node_type").and_then(Value::as_str) {
            Some("array") => {
                arrays.insert(name.clone(), node_v3(location, &name, meta)?);
            }
            Some("group") => {
                for child in location.list_children(&name).await? {
                    pending.push(format!("{name}/{child}"));
                }
            }
            _ => {}
        }
    }
    Ok(StoreMetadata {
        zarr_format: 3,
        consolidated: false,
        attributes,
        arrays,
    })
}

fn as_object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn node_v2(
    location: &StoreLocation,
    name: &str,
    zarray: &Value,
    attributes: Map<String, Value>,
) -> Result<ArrayNode> {
    let path = format!("{}/{name}/.zarray", location.url());
    let mut metadata: ArrayMetadataV2 =
        serde_json::from_value(zarray.clone()).map_err(|e| StoreError::metadata(&path, e))?;
    metadata.attributes = attributes.clone();
    let dims = attributes
        .get("_ARRAY_DIMENSIONS")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        });
    let array = make_array(location, name, ArrayMetadata::V2(metadata))?;
    Ok(ArrayNode {
        name: name.to_string(),
        dims,
        attributes,
        array: Arc::new(array),
    })
}

fn node_v3(location: &StoreLocation, name: &str, meta: Value) -> Result<ArrayNode> {
    let path = format!("{}/{name}/zarr.json", location.url());
    let metadata: ArrayMetadataV3 =
        serde_json::from_value(meta).map_err(|e| StoreError::metadata(&path, e))?;
    let attributes = metadata.attributes.clone();
    let dims = metadata.dimension_names.as_ref().map(|names| {
        names
            .iter()
            .map(|n| n.clone().unwrap_or_default())
            .collect()
    });
    let array = make_array(location, name, ArrayMetadata::V3(metadata))?;
    Ok(ArrayNode {
        name: name.to_string(),
        dims,
        attributes,
        array: Arc::new(array),
    })
}

fn make_array(location: &StoreLocation, name: &str, metadata: ArrayMetadata) -> Result<MetaArray> {
    let array_name = format!("{}/{name}", location.url());
    Array::new_with_metadata(Arc::new(()), &format!("/{name}"), metadata).map_err(|e| match e {
        ArrayCreateError::CodecsCreateError(detail) => StoreError::UnsupportedCodec {
            array: array_name,
            detail: detail.to_string(),
        },
        ArrayCreateError::DataTypeCreateError(detail) => StoreError::UnsupportedDataType {
            array: array_name,
            dtype: detail.to_string(),
        },
        // zarrs reports v2 conversion problems as text; sort them by what they name.
        ArrayCreateError::UnsupportedZarrV2Array(detail) if detail.contains("codec") => {
            StoreError::UnsupportedCodec {
                array: array_name,
                detail,
            }
        }
        ArrayCreateError::UnsupportedZarrV2Array(detail) if detail.contains("data type") => {
            StoreError::UnsupportedDataType {
                array: array_name,
                dtype: detail,
            }
        }
        other => StoreError::metadata(array_name, other),
    })
}
