//! The canonical view of an ERA5 store: one grid (latitude north→south, longitude 0→360 east),
//! one time axis (UTC), and variables with their levels, whatever layout, axis order, latitude
//! direction, longitude convention, time encoding or packing the store uses. Nothing is rewritten:
//! the view only records how canonical indices map to store indices.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use serde_json::{Map, Value};

use crate::error::{Result, StoreError};
use crate::store::cache::ChunkCache;
use crate::store::cf_time::CfTimeUnits;
use crate::store::decode::{decode_raw, to_f64};
use crate::store::discovery::{ArrayNode, StoreMetadata, discover};
use crate::store::location::StoreLocation;
use crate::store::missing::{MissingChunkPolicy, MissingChunks};
use crate::store::version::VersionLedger;

/// Default decoded-chunk cache size for a store opened on its own.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

const TIME_NAMES: &[&str] = &["time", "valid_time", "times", "date", "datetime"];
const LEVEL_NAMES: &[&str] = &[
    "level",
    "levels",
    "pressure_level",
    "isobaricinhpa",
    "plev",
    "lev",
    "model_level",
    "hybrid",
];
const LAT_NAMES: &[&str] = &["latitude", "lat", "lats"];
const LON_NAMES: &[&str] = &["longitude", "lon", "lons"];

/// The two store layouts of docs/design.md §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// One array per variable, xarray/CF style.
    PerVariable,
    /// AtmoRep's stacked `data` array (time, field, level, lat, lon).
    Atmorep,
}

/// Which canonical role a store dimension plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Time,
    Level,
    Lat,
    Lon,
    /// AtmoRep's field axis, fixed at one index per variable.
    Field(u64),
}

/// How stored values become physical values.
#[derive(Debug, Clone, PartialEq)]
pub struct Packing {
    /// `scale_factor` (1 when absent).
    pub scale: f64,
    /// `add_offset` (0 when absent).
    pub offset: f64,
    /// Stored values that mean "missing" (`_FillValue`, `missing_value`).
    pub missing: Vec<f64>,
}

impl Packing {
    pub(crate) fn is_identity(&self) -> bool {
        self.scale == 1.0 && self.offset == 0.0 && self.missing.iter().all(|m| m.is_nan())
    }
}

/// A variable of the canonical view.
#[derive(Debug, Clone)]
pub struct Variable {
    /// Variable name (ERA5 short name such as `t`, `z`, `vo`).
    pub name: String,
    /// The array holding it.
    pub node: ArrayNode,
    pub(crate) roles: Vec<Role>,
    /// Levels of this variable (empty for a surface variable), in store order.
    pub levels: Vec<f64>,
    /// Units attribute, if any.
    pub units: Option<String>,
    /// `long_name` attribute, if any.
    pub long_name: Option<String>,
    /// Stored data type as written in the metadata (e.g. `<i2`, `float32`).
    pub stored_dtype: String,
    /// Packing and missing values.
    pub packing: Packing,
    /// Unpacked f32 through exactly [bytes (little endian) → blosc]: small parts of its chunks
    /// are read block by block ([`crate::store::block_read`]).
    pub(crate) blosc_blocks: bool,
}

impl Variable {
    /// Whether the variable has a level axis.
    pub fn has_level(&self) -> bool {
        self.roles.contains(&Role::Level)
    }

    /// The full canonical shape (time, level, lat, lon); level is 1 for surface variables.
    pub fn canonical_shape(&self, dataset: &Dataset) -> [usize; 4] {
        [
            dataset.times.len(),
            self.levels.len().max(1),
            dataset.lats.len(),
            dataset.lons.len(),
        ]
    }

    /// Consecutive time ranges aligned with the variable's time chunks: reading the whole
    /// variable block by block decodes every chunk once and bounds memory to one block.
    pub fn time_blocks(&self, ntimes: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let axis = self
            .roles
            .iter()
            .position(|r| *r == Role::Time)
            .unwrap_or(0);
        let block = self.chunk_shape()[axis].max(1) as usize;
        (0..ntimes)
            .step_by(block)
            .map(move |t| t..(t + block).min(ntimes))
    }

    /// Chunk shape in the store's axis order (the outer/shard chunk for sharded arrays).
    pub fn chunk_shape(&self) -> Vec<u64> {
        let zeros = vec![0; self.node.array.dimensionality()];
        self.node
            .array
            .chunk_shape(&zeros)
            .map(|s| s.iter().map(|n| n.get()).collect())
            .unwrap_or_default()
    }
}

/// A chunk fetched from storage: (variable, chunk grid indices).
pub type FetchedChunk = (String, Vec<u64>);

/// Bytes moved by reads since the dataset was opened.
#[derive(Debug, Default)]
pub struct ReadCounters {
    /// Encoded bytes fetched from the object store.
    pub fetched_bytes: AtomicU64,
    /// Whole chunks fetched (cache misses that hit storage).
    pub fetched_chunks: AtomicU64,
    /// Blosc blocks fetched and decoded alone ([`crate::store::block_read`]); blocks stored
    /// back to back are fetched in one request.
    pub fetched_blocks: AtomicU64,
    /// Requests (or file reads) that fetched bytes: whole chunks, chunk headers, blocks.
    pub fetch_requests: AtomicU64,
    /// Bytes of decoded values produced by decoding.
    pub decoded_bytes: AtomicU64,
    /// Bytes of values delivered to callers.
    pub delivered_bytes: AtomicU64,
    /// Time spent decoding chunks, summed over threads.
    pub decode_nanos: AtomicU64,
}

/// An opened store in canonical form.
#[derive(Debug)]
pub struct Dataset {
    pub(crate) location: StoreLocation,
    /// What discovery found.
    pub metadata: StoreMetadata,
    /// Which layout the store uses.
    pub layout: Layout,
    /// Time steps, seconds since the Unix epoch (UTC), ascending.
    pub times: Vec<i64>,
    /// The CF units of the time coordinate.
    pub time_units: String,
    /// Canonical latitudes, north→south.
    pub lats: Vec<f64>,
    /// Canonical longitudes, 0→360 east.
    pub lons: Vec<f64>,
    /// Whether the store holds latitude ascending (south→north).
    pub lat_ascending: bool,
    /// Store longitude index of canonical longitude index 0.
    pub lon_shift: usize,
    /// Variables by name.
    pub variables: BTreeMap<String, Variable>,
    pub(crate) cache: Arc<ChunkCache>,
    pub(crate) cache_id: Arc<str>,
    /// Read counters.
    pub counters: ReadCounters,
    /// When set, every chunk fetched from storage is recorded as (variable, chunk indices), so
    /// a benchmark can replay exactly the decoding a run did.
    pub(crate) fetch_log: std::sync::Mutex<Option<Vec<FetchedChunk>>>,
    pub(crate) missing: MissingChunkPolicy,
    /// The version of each chunk first read, which every later read must find.
    pub(crate) versions: Arc<VersionLedger>,
    /// Whether small parts of blosc chunks are read block by block.
    pub(crate) block_reads: std::sync::atomic::AtomicBool,
    /// The block tables of chunks read block by block.
    pub(crate) blosc_indexes: crate::store::block_read::IndexCache,
    pub(crate) index_reads: crate::store::block_read::IndexReads,
    pub(crate) block_gates: std::sync::Mutex<crate::store::block_read::BlockGates>,
}

impl Dataset {
    /// Opens `url` with a private cache of [`DEFAULT_CACHE_BYTES`].
    pub async fn open(url: &str) -> Result<Self> {
        let location = StoreLocation::open(url)?;
        Self::open_location(location, Arc::new(ChunkCache::new(DEFAULT_CACHE_BYTES))).await
    }

    /// Opens a location with a shared cache.
    pub async fn open_location(location: StoreLocation, cache: Arc<ChunkCache>) -> Result<Self> {
        let metadata = discover(&location).await?;
        if metadata.arrays.contains_key("data")
            && metadata.arrays["data"].array.dimensionality() == 5
        {
            Self::open_atmorep(location, metadata, cache).await
        } else {
            Self::open_per_variable(location, metadata, cache).await
        }
    }

    /// The URL the dataset was opened from.
    pub fn url(&self) -> &str {
        self.location.url()
    }

    /// The store location.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// The shared chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Whether the longitudes go once around the globe at a regular step, so that the column
    /// after the last is the first. A regional grid (a CDS area subset) is not: windows and
    /// tiles must not wrap on it.
    pub fn lon_periodic(&self) -> bool {
        let n = self.lons.len();
        if n < 2 {
            return false;
        }
        let step = (self.lons[n - 1] - self.lons[0]) / (n - 1) as f64;
        step > 0.0 && (step * n as f64 - 360.0).abs() <= 0.01 * step
    }

    /// The store's name for the variable `requested` names: itself, or the one variable that
    /// is another ERA5 name of the same parameter (`temperature` for `t`, and back).
    pub fn resolve_name(
        &self,
        requested: &str,
    ) -> std::result::Result<&str, atmorep_proto::era5::NameError> {
        atmorep_proto::era5::resolve(requested, self.variables.keys().map(String::as_str))
    }

    /// Looks up a variable, naming the ones that exist when it is missing.
    pub fn variable(&self, name: &str) -> Result<&Variable> {
        self.variables
            .get(name)
            .ok_or_else(|| StoreError::UnknownVariable {
                url: self.url().to_string(),
                name: name.to_string(),
                available: self
                    .variables
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Canonical latitude index → store latitude index.
    pub fn store_lat(&self, y: usize) -> usize {
        if self.lat_ascending {
            self.lats.len() - 1 - y
        } else {
            y
        }
    }

    /// Canonical longitude index → store longitude index.
    pub fn store_lon(&self, x: usize) -> usize {
        (x + self.lon_shift) % self.lons.len()
    }

    /// The view of a store whose time axis, grid and variables have been resolved.
    fn resolved(
        location: StoreLocation,
        metadata: StoreMetadata,
        layout: Layout,
        (times, time_units): (Vec<i64>, String),
        grid: Grid,
        variables: BTreeMap<String, Variable>,
        cache: Arc<ChunkCache>,
    ) -> Self {
        Self {
            cache_id: Arc::from(location.url()),
            location,
            metadata,
            layout,
            times,
            time_units,
            lats: grid.lats,
            lons: grid.lons,
            lat_ascending: grid.lat_ascending,
            lon_shift: grid.lon_shift,
            variables,
            cache,
            counters: ReadCounters::default(),
            fetch_log: std::sync::Mutex::new(None),
            missing: MissingChunkPolicy::default(),
            versions: Arc::default(),
            block_reads: std::sync::atomic::AtomicBool::new(true),
            blosc_indexes: crate::store::block_read::index_cache(),
            index_reads: Default::default(),
            block_gates: Default::default(),
        }
    }

    /// How many distinct chunks were found missing so far.
    pub fn missing_chunks_reported(&self) -> usize {
        self.missing.reported()
    }

    /// Serves this store as `dataset` with `mode` for its missing chunks. Under
    /// [`MissingChunks::Error`] its chunks are cached apart from other datasets of the same store,
    /// which may hold fill values for the very chunks this one must refuse.
    pub fn set_missing_chunks(&mut self, dataset: &str, mode: MissingChunks) {
        if mode == MissingChunks::Error {
            self.cache_id = Arc::from(format!("{}#missing_chunks=error", self.location.url()));
        }
        self.missing = MissingChunkPolicy::new(dataset, mode);
    }

    async fn open_per_variable(
        location: StoreLocation,
        metadata: StoreMetadata,
        cache: Arc<ChunkCache>,
    ) -> Result<Self> {
        let find = |names: &[&str], standard: &str, axis: &str| -> Option<&ArrayNode> {
            metadata
                .arrays
                .values()
                .filter(|n| n.array.dimensionality() == 1)
                .find(|n| names.contains(&n.name.to_ascii_lowercase().as_str()))
                .or_else(|| {
                    metadata.arrays.values().find(|n| {
                        n.array.dimensionality() == 1
                            && (attr_str(&n.attributes, "standard_name") == Some(standard)
                                || attr_str(&n.attributes, "axis") == Some(axis))
                    })
                })
        };
        let url = location.url().to_string();
        let missing =
            |what: &str| StoreError::metadata(&url, format!("no {what} coordinate found"));
        let time = find(TIME_NAMES, "time", "T").ok_or_else(|| missing("time"))?;
        let lat = find(LAT_NAMES, "latitude", "Y").ok_or_else(|| missing("latitude"))?;
        let lon = find(LON_NAMES, "longitude", "X").ok_or_else(|| missing("longitude"))?;
        let level = find(LEVEL_NAMES, "air_pressure", "Z");
        let (times, time_units) = read_times(&location, time).await?;
        let store_lats = read_coordinate(&location, lat).await?;
        let store_lons = read_coordinate(&location, lon).await?;
        let levels = match level {
            Some(node) => read_coordinate(&location, node).await?,
            None => Vec::new(),
        };
        let grid = Grid::new(&url, &store_lats, &store_lons)?;
        let coord_names: Vec<&str> = [Some(time), Some(lat), Some(lon), level]
            .into_iter()
            .flatten()
            .map(|n| n.name.as_str())
            .collect();

        let mut variables = BTreeMap::new();
        for node in metadata.arrays.values() {
            if coord_names.contains(&node.name.as_str()) || node.array.dimensionality() < 3 {
                continue;
            }
            let Some(dims) = &node.dims else { continue };
            let mut roles = Vec::with_capacity(dims.len());
            for dim in dims {
                let role = if dim == &time.name {
                    Role::Time
                } else if dim == &lat.name {
                    Role::Lat
                } else if dim == &lon.name {
                    Role::Lon
                } else if level.is_some_and(|l| &l.name == dim) {
                    Role::Level
                } else {
                    break;
                };
                roles.push(role);
            }
            // Arrays with other dimensions (ensemble members, bounds…) are not ERA5 fields.
            if roles.len() != dims.len() || !roles.contains(&Role::Time) {
                continue;
            }
            let shape = node.array.shape();
            let expected = |r: Role| match r {
                Role::Time => times.len(),
                Role::Lat => store_lats.len(),
                Role::Lon => store_lons.len(),
                Role::Level => levels.len(),
                Role::Field(_) => 1,
            };
            if let Some((r, n)) = roles
                .iter()
                .zip(shape)
                .find(|(r, n)| **n as usize != expected(**r))
            {
                return Err(StoreError::metadata(
                    format!("{url}/{}", node.name),
                    format!("{r:?} axis has length {n}, its coordinate {}", expected(*r)),
                ));
            }
            let has_level = roles.contains(&Role::Level);
            variables.insert(
                node.name.clone(),
                make_variable(
                    &url,
                    node.name.clone(),
                    node,
                    roles,
                    if has_level {
                        levels.clone()
                    } else {
                        Vec::new()
                    },
                )?,
            );
        }
        Ok(Self::resolved(
            location,
            metadata,
            Layout::PerVariable,
            (times, time_units),
            grid,
            variables,
            cache,
        ))
    }

    async fn open_atmorep(
        location: StoreLocation,
        metadata: StoreMetadata,
        cache: Arc<ChunkCache>,
    ) -> Result<Self> {
        let url = location.url().to_string();
        let data = &metadata.arrays["data"];
        let need = |name: &str| {
            metadata.arrays.get(name).ok_or_else(|| {
                StoreError::metadata(&url, format!("AtmoRep layout without `{name}`"))
            })
        };
        let (times, time_units) = read_times(&location, need("time")?).await?;
        // AtmoRep stores colatitude (0 at the north pole) in `lats`.
        let raw_lats = read_coordinate(&location, need("lats")?).await?;
        let colatitude = raw_lats.iter().all(|v| (-1e-6..=180.0 + 1e-6).contains(v))
            && raw_lats.iter().any(|v| *v > 90.0 + 1e-6);
        let store_lats: Vec<f64> = if colatitude {
            raw_lats.iter().map(|c| 90.0 - c).collect()
        } else {
            raw_lats
        };
        let store_lons = read_coordinate(&location, need("lons")?).await?;
        let grid = Grid::new(&url, &store_lats, &store_lons)?;
        let attr_list = |key: &str| {
            data.attributes
                .get(key)
                .or_else(|| metadata.attributes.get(key))
                .and_then(Value::as_array)
                .cloned()
        };
        let fields: Vec<String> = attr_list("fields")
            .ok_or_else(|| StoreError::metadata(format!("{url}/data"), "no `fields` attribute"))?
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let levels: Vec<f64> = match metadata.arrays.get("levels") {
            Some(node) => read_coordinate(&location, node).await?,
            None => attr_list("levels")
                .ok_or_else(|| StoreError::metadata(format!("{url}/data"), "no `levels`"))?
                .iter()
                .filter_map(Value::as_f64)
                .collect(),
        };
        let shape = data.array.shape();
        let expect = [
            times.len(),
            fields.len(),
            levels.len(),
            store_lats.len(),
            store_lons.len(),
        ];
        if shape.iter().zip(expect).any(|(a, b)| *a as usize != b) {
            return Err(StoreError::metadata(
                format!("{url}/data"),
                format!("shape {shape:?} does not match coordinates {expect:?}"),
            ));
        }
        let mut variables = BTreeMap::new();
        for (index, field) in fields.iter().enumerate() {
            let roles = vec![
                Role::Time,
                Role::Field(index as u64),
                Role::Level,
                Role::Lat,
                Role::Lon,
            ];
            variables.insert(
                field.clone(),
                make_variable(&url, field.clone(), data, roles, levels.clone())?,
            );
        }
        Ok(Self::resolved(
            location,
            metadata,
            Layout::Atmorep,
            (times, time_units),
            grid,
            variables,
            cache,
        ))
    }

    /// Whether a chunk was found changed since the store was opened (see [`crate::store::version`]).
    pub fn store_changed_seen(&self) -> bool {
        self.versions.changed()
    }

    /// Starts (or, with `false`, stops and returns) recording the chunks fetched from storage.
    pub fn record_fetches(&self, on: bool) -> Vec<FetchedChunk> {
        let mut log = self
            .fetch_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let taken = log.take().unwrap_or_default();
        if on {
            *log = Some(Vec::new());
        }
        taken
    }

    pub(crate) fn cache_key(&self, node: &ArrayNode) -> Arc<str> {
        Arc::from(format!("{}/{}", self.cache_id, node.name).as_str())
    }
}

fn attr_str<'a>(attrs: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    attrs.get(key).and_then(Value::as_str)
}

fn attr_f64(attrs: &Map<String, Value>, key: &str) -> Option<f64> {
    attrs.get(key).and_then(Value::as_f64)
}

fn make_variable(
    url: &str,
    name: String,
    node: &ArrayNode,
    roles: Vec<Role>,
    levels: Vec<f64>,
) -> Result<Variable> {
    let array = &node.array;
    let attrs = &node.attributes;
    let mut missing = Vec::new();
    for key in ["_FillValue", "missing_value"] {
        match attrs.get(key) {
            Some(Value::Number(n)) => missing.extend(n.as_f64()),
            Some(Value::Array(values)) => missing.extend(values.iter().filter_map(Value::as_f64)),
            // Zarr v3 stores written by xarray carry `_FillValue` as base64 bytes; the array's
            // own fill value (below) says the same thing.
            _ => {}
        }
    }
    // xarray treats a v2 array's `fill_value` as `_FillValue`; follow it so values match.
    let (stored_dtype, fill_is_missing) = match array.metadata() {
        zarrs::array::ArrayMetadata::V2(m) => (
            serde_json::to_value(&m.dtype)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "structured".into()),
            !attrs.contains_key("_FillValue"),
        ),
        zarrs::array::ArrayMetadata::V3(m) => (m.data_type.name().to_string(), false),
    };
    if fill_is_missing {
        let fill =
            to_f64(array.data_type(), array.fill_value().as_ne_bytes()).ok_or_else(|| {
                StoreError::UnsupportedDataType {
                    array: format!("{url}/{}", node.name),
                    dtype: stored_dtype.clone(),
                }
            })?;
        missing.extend(fill.into_iter().filter(|v| !v.is_nan()));
    } else if to_f64(array.data_type(), &[]).is_none() {
        return Err(StoreError::UnsupportedDataType {
            array: format!("{url}/{}", node.name),
            dtype: stored_dtype,
        });
    }
    let packing = Packing {
        scale: attr_f64(attrs, "scale_factor").unwrap_or(1.0),
        offset: attr_f64(attrs, "add_offset").unwrap_or(0.0),
        missing,
    };
    Ok(Variable {
        blosc_blocks: packing.is_identity() && crate::store::block_read::is_blosc_f32(array),
        name,
        node: node.clone(),
        roles,
        levels,
        units: attr_str(attrs, "units").map(str::to_string),
        long_name: attr_str(attrs, "long_name").map(str::to_string),
        stored_dtype,
        packing,
    })
}

/// Reads a whole 1-D array as raw f64 values.
pub(crate) async fn read_coordinate(
    location: &StoreLocation,
    node: &ArrayNode,
) -> Result<Vec<f64>> {
    let array = &node.array;
    let len = array.shape()[0] as usize;
    let mut out = Vec::with_capacity(len);
    for c in 0..array.chunk_grid_shape()[0] {
        let key = array.chunk_key(&[c]).to_string();
        let encoded = location.get(&key).await?;
        let corrupt = |detail: String| StoreError::CorruptChunk {
            array: format!("{}/{}", location.url(), node.name),
            key: key.clone(),
            detail,
        };
        let (raw, _) = decode_raw(array, &[c], encoded.as_deref()).map_err(corrupt)?;
        let values =
            to_f64(array.data_type(), &raw).ok_or_else(|| StoreError::UnsupportedDataType {
                array: format!("{}/{}", location.url(), node.name),
                dtype: format!("{:?}", array.data_type()),
            })?;
        out.extend(values);
    }
    out.truncate(len);
    Ok(out)
}

async fn read_times(location: &StoreLocation, node: &ArrayNode) -> Result<(Vec<i64>, String)> {
    let raw = read_coordinate(location, node).await?;
    let name = format!("{}/{}", location.url(), node.name);
    let units = attr_str(&node.attributes, "units").ok_or_else(|| StoreError::CfTime {
        array: name.clone(),
        detail: "no `units` attribute".into(),
    })?;
    let calendar = attr_str(&node.attributes, "calendar");
    let cf = CfTimeUnits::parse(units, calendar).map_err(|e| StoreError::CfTime {
        array: name.clone(),
        detail: e.to_string(),
    })?;
    let times = raw
        .iter()
        .map(|v| cf.decode(*v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::CfTime {
            array: name.clone(),
            detail: e.to_string(),
        })?;
    if times.windows(2).any(|w| w[1] <= w[0]) {
        return Err(StoreError::CfTime {
            array: name,
            detail: "time is not strictly increasing".into(),
        });
    }
    Ok((times, units.to_string()))
}

struct Grid {
    lats: Vec<f64>,
    lons: Vec<f64>,
    lat_ascending: bool,
    lon_shift: usize,
}

impl Grid {
    fn new(url: &str, store_lats: &[f64], store_lons: &[f64]) -> Result<Self> {
        let bad = |detail: &str| StoreError::metadata(url, detail);
        if store_lats.len() < 2 || store_lons.len() < 2 {
            return Err(bad("the grid needs at least two latitudes and longitudes"));
        }
        let lat_ascending = store_lats[1] > store_lats[0];
        let mut lats = store_lats.to_vec();
        if lat_ascending {
            lats.reverse();
        }
        if lats.windows(2).any(|w| w[1] >= w[0]) {
            return Err(bad("latitude is not monotonic"));
        }
        let wrapped: Vec<f64> = store_lons.iter().map(|l| l.rem_euclid(360.0)).collect();
        let lon_shift = wrapped
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let n = wrapped.len();
        let lons: Vec<f64> = (0..n).map(|x| wrapped[(x + lon_shift) % n]).collect();
        if lons.windows(2).any(|w| w[1] <= w[0]) {
            return Err(bad("longitude is not monotonic east"));
        }
        Ok(Self {
            lats,
            lons,
            lat_ascending,
            lon_shift,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_canonicalizes_ascending_latitude_and_negative_longitude() {
        let lats = [-90.0, -45.0, 0.0, 45.0, 90.0];
        let lons: Vec<f64> = (0..8).map(|i| -180.0 + 45.0 * i as f64).collect();
        let g = Grid::new("mem", &lats, &lons).unwrap();
        assert_eq!(g.lats, vec![90.0, 45.0, 0.0, -45.0, -90.0]);
        assert!(g.lat_ascending);
        assert_eq!(
            g.lons,
            vec![0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]
        );
        assert_eq!(g.lon_shift, 4); // store index 4 holds lon 0
    }

    #[test]
    fn grid_rejects_unordered_coordinates() {
        assert!(Grid::new("mem", &[0.0, 10.0, 5.0], &[0.0, 1.0]).is_err());
        assert!(Grid::new("mem", &[10.0, 0.0], &[0.0, 20.0, 10.0]).is_err());
    }
}
