//! Reading only the blosc blocks a read uses (docs/performance.md, "Reading only the blosc blocks
//! a request uses"). A variable stored as f32 through exactly [bytes (little endian) → blosc],
//! unpacked, is read block by block when a read uses a small part of a chunk (a few levels of a
//! chunk holding many): the chunk's header is fetched with a bounded range read and its block
//! table kept per chunk, then only the needed blocks' byte ranges are fetched (range requests
//! of the object store, positioned reads of a local file; blocks stored back to back, such as
//! the blocks of one level, in one request), each decoded alone
//! ([`crate::store::blosc_blocks`]) and cached as its own entry of the chunk cache. Every read
//! checks the object's version like a whole read ([`crate::store::version`]); a missing chunk,
//! and every other variable, takes the whole-chunk path.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use object_store::{GetOptions, GetRange};

use crate::error::{Result, StoreError};
use crate::store::blosc_blocks::{BloscIndex, FIRST_READ};
use crate::store::cache::{ChunkKey, DecodedChunk};
use crate::store::dataset::{Dataset, Variable};
use crate::store::decode::run_on_rayon;
use crate::store::discovery::MetaArray;
use crate::store::location::local_outcome;
use crate::store::version::ObjectVersion;

/// Block tables kept (about 1 KB each): enough for every chunk of a long run of a large store.
pub(crate) const INDEX_CACHE_ENTRIES: usize = 1 << 16;

/// A read uses the block path when its steps and levels are less than this share of a chunk's
/// (a few levels of a chunk holding many), and when it needs less than this fraction of the
/// chunk's encoded bytes once its block table is known. A chunk of one step and level (the globe)
/// is read whole: the samples of a block together cover most of it, and whole reads of it are
/// cheaper than block by block (docs/performance.md).
const SMALL_PART: f64 = 0.5;

/// Chunks smaller than this (decoded) are read whole: a range request costs about as much as
/// reading all of it.
const SMALL_CHUNK: usize = 1 << 16;

/// The block tables of the chunks read block by block, by chunk.
pub(crate) type IndexCache = std::sync::Mutex<lru::LruCache<ChunkKey, Arc<BloscIndex>>>;

/// One turn per chunk for the readers fetching its missing blocks.
pub(crate) type BlockGates = std::collections::HashMap<ChunkKey, Arc<tokio::sync::Mutex<()>>>;

/// Header reads in flight, by chunk.
pub(crate) type IndexReads = std::sync::Mutex<
    std::collections::HashMap<ChunkKey, Arc<tokio::sync::OnceCell<Option<Arc<BloscIndex>>>>>,
>;

pub(crate) fn index_cache() -> IndexCache {
    std::sync::Mutex::new(lru::LruCache::new(
        std::num::NonZeroUsize::new(INDEX_CACHE_ENTRIES).expect("positive"),
    ))
}

/// Whether `array`'s chunks are f32 values through exactly [bytes (little endian) → blosc].
pub(crate) fn is_blosc_f32(array: &MetaArray) -> bool {
    use zarrs::array::data_type::Float32DataType;
    if !array.data_type().is::<Float32DataType>() || cfg!(target_endian = "big") {
        return false;
    }
    let codecs = array.codecs();
    if !codecs.array_to_array_codecs().is_empty() || codecs.bytes_to_bytes_codecs().len() != 1 {
        return false;
    }
    let metas = codecs.create_metadatas(&zarrs::array::CodecMetadataOptions::default());
    let Ok(metas) = serde_json::to_value(&metas) else {
        return false;
    };
    let name = |i: usize| metas[i]["name"].as_str();
    name(0) == Some("bytes")
        && metas[0]["configuration"]["endian"].as_str() == Some("little")
        && name(1) == Some("blosc")
        && metas.as_array().map(Vec::len) == Some(2)
}

/// The values of one chunk a read uses: the whole chunk, or the blocks the read touches.
#[derive(Debug)]
pub(crate) enum ChunkData {
    Whole(Arc<DecodedChunk>),
    Blocks(BlockedChunk),
}

/// Some blocks of one chunk, each `block_len` values of the chunk's C order.
#[derive(Debug)]
pub(crate) struct BlockedChunk {
    shape: Vec<usize>,
    block_len: usize,
    blocks: Vec<Option<Arc<DecodedChunk>>>,
}

impl ChunkData {
    /// The chunk shape in the store's axis order.
    pub(crate) fn shape(&self) -> &[usize] {
        match self {
            Self::Whole(chunk) => &chunk.shape,
            Self::Blocks(blocks) => &blocks.shape,
        }
    }

    /// Hands `copy` the values `start..start + len` of the chunk in pieces, each with its
    /// offset in the run. Only values the read touches were decoded: a run outside them is a bug
    /// of the planner, and panics.
    #[inline]
    pub(crate) fn pieces(&self, start: usize, len: usize, mut copy: impl FnMut(usize, &[f32])) {
        match self {
            Self::Whole(chunk) => copy(0, &chunk.values()[start..start + len]),
            Self::Blocks(b) => {
                let mut done = 0;
                while done < len {
                    let at = start + done;
                    let (j, offset) = (at / b.block_len, at % b.block_len);
                    let n = (b.block_len - offset).min(len - done);
                    let block = b.blocks[j]
                        .as_ref()
                        .expect("a run reads only blocks its read fetched");
                    copy(done, &block.values()[offset..offset + n]);
                    done += n;
                }
            }
        }
    }

    /// The whole chunk's values, when they are at hand (for prefetching).
    pub(crate) fn values(&self) -> Option<&[f32]> {
        match self {
            Self::Whole(chunk) => Some(chunk.values()),
            Self::Blocks(_) => None,
        }
    }
}

/// The value ranges of a chunk of `shape` that a read touches: one per row (point of the outer
/// axes, `outer` holding each axis's chunk indices), spanning `inner` (`first..last` of the
/// innermost axis), merged and sorted.
pub(crate) fn touched_ranges(
    shape: &[usize],
    outer: &[Vec<usize>],
    inner: Range<usize>,
) -> Vec<Range<usize>> {
    let ndim = shape.len();
    let mut strides = vec![1usize; ndim];
    for a in (0..ndim - 1).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let mut starts = vec![0usize];
    for (axis, indices) in outer.iter().enumerate() {
        let stride = strides[axis];
        starts = starts
            .iter()
            .flat_map(|s| indices.iter().map(move |&i| s + i * stride))
            .collect();
    }
    starts.sort_unstable();
    let mut ranges: Vec<Range<usize>> = Vec::with_capacity(starts.len());
    for s in starts {
        let r = s + inner.start..s + inner.end;
        match ranges.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => ranges.push(r),
        }
    }
    ranges
}

impl Dataset {
    /// Turns block reads on or off (on by default): off, every read takes the whole-chunk path.
    pub fn set_block_reads(&self, on: bool) {
        self.block_reads.store(on, Ordering::Relaxed);
    }

    /// Whether a read of a chunk of `variable` holding `values` values, whose steps and levels
    /// are `share` of the chunk's, takes the block path.
    pub(crate) fn wants_blocks(&self, variable: &Variable, values: usize, share: f64) -> bool {
        variable.blosc_blocks
            && self.block_reads.load(Ordering::Relaxed)
            && values * 4 >= SMALL_CHUNK
            && share < SMALL_PART
    }

    /// The values `touched` (value ranges) of chunk `indices` of `variable`: only the blocks
    /// holding them, fetched and decoded through the cache; the whole chunk when it is missing.
    pub(crate) async fn chunk_blocks(
        &self,
        variable: &Variable,
        indices: &[u64],
        touched: &[Range<usize>],
    ) -> Result<ChunkData> {
        let store_key = variable.node.array.chunk_key(indices).to_string();
        let shape: Vec<usize> = variable
            .node
            .array
            .chunk_shape(indices)
            .map_err(|e| self.corrupt(variable, &store_key, e.to_string()))?
            .iter()
            .map(|n| n.get() as usize)
            .collect();
        let Some(index) = self.blosc_index(variable, indices, &store_key).await? else {
            return Ok(ChunkData::Whole(self.chunk(variable, indices).await?));
        };
        let values: usize = shape.iter().product();
        if index.nbytes != values * 4 {
            return Err(self.corrupt(
                variable,
                &store_key,
                format!(
                    "blosc header says {} decoded bytes, the chunk holds {}",
                    index.nbytes,
                    values * 4
                ),
            ));
        }
        if index.blocksize % 4 != 0 {
            // Blocks that split floats: not worth a path of their own.
            return Ok(ChunkData::Whole(self.chunk(variable, indices).await?));
        }
        let needed: BTreeSet<usize> = touched
            .iter()
            .flat_map(|r| index.blocks_for(r.start * 4..r.end * 4))
            .collect();
        let encoded: usize = needed.iter().map(|&j| index.encoded_range(j).len()).sum();
        if index.nblocks() == 1 || encoded as f64 >= SMALL_PART * index.cbytes as f64 {
            // Most of the chunk after all: one whole read serves it.
            return Ok(ChunkData::Whole(self.chunk(variable, indices).await?));
        }
        let key_name: Arc<str> =
            Arc::from(format!("{}#blosc-blocks", self.cache_key(&variable.node)).as_str());
        let block_key = |j: usize| {
            let mut key = indices.to_vec();
            key.push(j as u64);
            (key_name.clone(), key)
        };
        // Blocks not cached that are stored back to back: one range read per run of them. The
        // readers of one chunk take turns here, so a run is read once, not once per sample.
        let gate_key: ChunkKey = (key_name.clone(), indices.to_vec());
        let gate = self
            .lock_gates()
            .entry(gate_key.clone())
            .or_default()
            .clone();
        let held = gate.lock().await;
        let mut blocks = vec![None; index.nblocks()];
        let mut missing = Vec::new();
        for &j in &needed {
            match self.cache.get(&block_key(j)) {
                Some(block) => blocks[j] = Some(block),
                None => missing.push(j),
            }
        }
        missing.sort_by_key(|&j| index.encoded_range(j).start);
        let mut runs: Vec<Vec<usize>> = Vec::new();
        for j in missing {
            match runs.last_mut() {
                Some(run)
                    if index.encoded_range(run[run.len() - 1]).end
                        == index.encoded_range(j).start =>
                {
                    run.push(j);
                }
                _ => runs.push(vec![j]),
            }
        }
        let run_reads = runs.into_iter().map(|run| {
            let (index, store_key, block_key) = (&index, &store_key, &block_key);
            async move {
                let span =
                    index.encoded_range(run[0]).start..index.encoded_range(run[run.len() - 1]).end;
                let bytes = self
                    .read_block_bytes(variable, store_key, span.clone())
                    .await?;
                let mut decoded = Vec::with_capacity(run.len());
                for &j in &run {
                    let range = index.encoded_range(j);
                    let encoded = bytes.slice(range.start - span.start..range.end - span.start);
                    let decode = || async {
                        self.decode_block(variable, store_key, index, j, encoded)
                            .await
                            .map_err(Arc::new)
                    };
                    let block = self
                        .cache
                        .get_or_load(block_key(j), decode)
                        .await
                        .map_err(StoreError::unshare)?;
                    decoded.push((j, block));
                }
                Ok::<_, StoreError>(decoded)
            }
        });
        let read = futures::future::try_join_all(run_reads).await;
        drop(held);
        {
            let mut gates = self.lock_gates();
            // Only the map and this reader hold it: nobody waits.
            if Arc::strong_count(&gate) == 2 {
                gates.remove(&gate_key);
            }
        }
        for (j, block) in read?.into_iter().flatten() {
            blocks[j] = Some(block);
        }
        Ok(ChunkData::Blocks(BlockedChunk {
            shape,
            block_len: index.blocksize / 4,
            blocks,
        }))
    }

    pub(crate) fn corrupt(&self, variable: &Variable, key: &str, detail: String) -> StoreError {
        StoreError::CorruptChunk {
            array: format!("{}/{}", self.url(), variable.node.name),
            key: key.to_string(),
            detail,
        }
    }

    /// The block table of a chunk: kept, or read from its first bytes; `None` when the chunk
    /// is missing.
    async fn blosc_index(
        &self,
        variable: &Variable,
        indices: &[u64],
        store_key: &str,
    ) -> Result<Option<Arc<BloscIndex>>> {
        let key: ChunkKey = (self.cache_key(&variable.node), indices.to_vec());
        if let Some(index) = self.lock_indexes().get(&key) {
            return Ok(Some(index.clone()));
        }
        // Concurrent readers of one chunk (the samples of a batch) share one header read.
        let cell = self
            .index_reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let read = cell
            .get_or_try_init(|| self.read_index(variable, store_key))
            .await
            .cloned();
        // Kept before the read is forgotten, so a later reader finds one or the other.
        if let Ok(Some(index)) = &read {
            self.lock_indexes().put(key.clone(), index.clone());
        }
        self.index_reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key);
        read
    }

    /// Reads a chunk's block table from its first bytes; `None` when the chunk is missing.
    async fn read_index(
        &self,
        variable: &Variable,
        store_key: &str,
    ) -> Result<Option<Arc<BloscIndex>>> {
        let Some(mut first) = self.read_range(variable, store_key, 0..FIRST_READ).await? else {
            return Ok(None);
        };
        let bad = |e: crate::store::blosc_blocks::BloscIndexError| {
            self.corrupt(variable, store_key, e.to_string())
        };
        let header = BloscIndex::header_len(&first).map_err(bad)?;
        if first.len() < header && first.len() == FIRST_READ {
            // More blocks than the first read covers: the rest of the table.
            let Some(rest) = self
                .read_range(variable, store_key, FIRST_READ..header)
                .await?
            else {
                return Ok(None);
            };
            let mut all = first.to_vec();
            all.extend_from_slice(&rest);
            first = Bytes::from(all);
        }
        Ok(Some(Arc::new(BloscIndex::parse(&first).map_err(bad)?)))
    }

    fn lock_gates(&self) -> std::sync::MutexGuard<'_, BlockGates> {
        // Every update is one call on the map: a poisoned lock holds consistent data.
        self.block_gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn lock_indexes(
        &self,
    ) -> std::sync::MutexGuard<'_, lru::LruCache<ChunkKey, Arc<BloscIndex>>> {
        // Every update is one call on the map: a poisoned lock holds consistent data.
        self.blosc_indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the encoded bytes `range` (blocks) of a chunk whose header was read.
    async fn read_block_bytes(
        &self,
        variable: &Variable,
        store_key: &str,
        range: Range<usize>,
    ) -> Result<Bytes> {
        let expected = range.len();
        let encoded = self
            .read_range(variable, store_key, range.clone())
            .await?
            .ok_or_else(|| {
                self.corrupt(
                    variable,
                    store_key,
                    format!("bytes {range:?} read after the chunk's header found the chunk gone"),
                )
            })?;
        if encoded.len() != expected {
            return Err(self.corrupt(
                variable,
                store_key,
                format!(
                    "bytes {range:?}: {} read, the header says {expected}",
                    encoded.len()
                ),
            ));
        }
        Ok(encoded)
    }

    /// Decodes block `j` of a chunk from its encoded bytes, on the rayon pool.
    async fn decode_block(
        &self,
        variable: &Variable,
        store_key: &str,
        index: &Arc<BloscIndex>,
        j: usize,
        encoded: Bytes,
    ) -> Result<Arc<DecodedChunk>> {
        let started = std::time::Instant::now();
        let index = index.clone();
        let decoded = run_on_rayon(move || index.decode_block(j, &encoded)).await?;
        let bytes = decoded.map_err(|e| self.corrupt(variable, store_key, e.to_string()))?;
        let len = bytes.len();
        let block = DecodedChunk::from_native_bytes(bytes, vec![len / 4]);
        self.counters.fetched_blocks.fetch_add(1, Ordering::Relaxed);
        self.counters
            .decoded_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.counters
            .decode_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(Arc::new(block))
    }

    /// Reads bytes `range` of the chunk object `store_key` (fewer when the object ends before),
    /// checking its version; `Ok(None)` when it does not exist.
    async fn read_range(
        &self,
        variable: &Variable,
        store_key: &str,
        range: Range<usize>,
    ) -> Result<Option<Bytes>> {
        let read = match self.location.local_root() {
            Some(root) => {
                let mut path = root.to_path_buf();
                path.extend(store_key.split('/').filter(|s| !s.is_empty()));
                let url = format!("{}/{store_key}", self.url().trim_end_matches('/'));
                let range = range.clone();
                run_on_rayon(move || read_local_range(&path, &url, range)).await??
            }
            None => {
                let options = GetOptions {
                    range: Some(GetRange::Bounded(range.start as u64..range.end as u64)),
                    ..Default::default()
                };
                let path = self.location.path(store_key);
                let got = async {
                    let answer = self.location.store().get_opts(&path, options).await?;
                    let version = ObjectVersion::of_object(&answer.meta);
                    Ok((answer.bytes().await?, version))
                }
                .await;
                match got {
                    Ok(read) => Some(read),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(source) => return Err(self.location.error(store_key, source)),
                }
            }
        };
        let version = read.as_ref().map_or(ObjectVersion::Absent, |(_, v)| *v);
        if let Err(changed) = self.versions.check(store_key, version) {
            return Err(self.store_changed(&variable.node.name, store_key, changed));
        }
        if let Some((bytes, _)) = &read {
            self.counters
                .fetched_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.counters.fetch_requests.fetch_add(1, Ordering::Relaxed);
        }
        Ok(read.map(|(bytes, _)| bytes))
    }
}

/// A positioned read of `range` of a local file (clamped to its end) with the file's version.
fn read_local_range(
    path: &std::path::Path,
    url: &str,
    range: Range<usize>,
) -> Result<Option<(Bytes, ObjectVersion)>> {
    use std::os::unix::fs::FileExt as _;
    let read = std::fs::File::open(path).and_then(|file| {
        let meta = file.metadata()?;
        let end = range.end.min(meta.len() as usize);
        let mut buf = vec![0u8; end.saturating_sub(range.start)];
        file.read_exact_at(&mut buf, range.start as u64)?;
        // The version after the read: a rewrite during it shows.
        Ok((Bytes::from(buf), ObjectVersion::of_file(&file.metadata()?)))
    });
    local_outcome(read, || url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_ranges_merge_adjacent_rows() {
        // A (2, 3, 4) chunk: levels 0 and 1 of row... every row of level 1, columns 1..3.
        assert_eq!(
            touched_ranges(&[2, 3, 4], &[vec![1], vec![0, 1, 2]], 1..3),
            vec![13..15, 17..19, 21..23]
        );
        // Whole rows merge into one range per level.
        assert_eq!(
            touched_ranges(&[2, 3, 4], &[vec![0, 1], vec![1, 2]], 0..4),
            vec![4..12, 16..24]
        );
    }
}
