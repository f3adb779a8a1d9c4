//! A memory-bounded LRU cache of decoded chunks, shared by every reader of a store (and, through
//! an `Arc`, by every store a server opens), so overlapping windows decode each chunk once.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;

/// A decoded chunk in physical units (packing applied, missing values as NaN), in the chunk's
/// own C order and full (padded) chunk shape.
#[derive(Debug)]
pub struct DecodedChunk {
    storage: Storage,
    /// The chunk shape in the store's axis order.
    pub shape: Vec<usize>,
}

/// Plain f32 chunks keep the decoder's byte buffer as is (no copy); everything else is
/// converted once into floats.
#[derive(Debug)]
enum Storage {
    NativeBytes(Vec<u8>),
    Floats(Vec<f32>),
}

impl DecodedChunk {
    /// A chunk from physical values.
    pub fn new(values: Vec<f32>, shape: Vec<usize>) -> Self {
        Self {
            storage: Storage::Floats(values),
            shape,
        }
    }

    /// A chunk from native-endian f32 bytes, kept without copying when suitably aligned.
    pub fn from_native_bytes(bytes: Vec<u8>, shape: Vec<usize>) -> Self {
        let storage = if bytemuck::try_cast_slice::<u8, f32>(&bytes).is_ok() {
            Storage::NativeBytes(bytes)
        } else {
            Storage::Floats(bytemuck::pod_collect_to_vec(&bytes))
        };
        Self { storage, shape }
    }

    /// The values, C order over `shape`.
    pub fn values(&self) -> &[f32] {
        match &self.storage {
            Storage::NativeBytes(bytes) => bytemuck::cast_slice(bytes),
            Storage::Floats(values) => values,
        }
    }

    fn bytes(&self) -> u64 {
        std::mem::size_of_val(self.values()) as u64
    }
}

/// Identifies a chunk: store URL, array path, chunk grid indices.
pub type ChunkKey = (Arc<str>, Vec<u64>);

/// Counters describing how the cache has been used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub resident_bytes: u64,
    pub capacity_bytes: u64,
}

/// The shared decoded-chunk cache. Capacity is in bytes of decoded f32 values.
#[derive(Debug)]
pub struct ChunkCache {
    capacity_bytes: u64,
    inner: Mutex<Inner>,
    /// Chunks being fetched and decoded right now: concurrent readers of the same chunk wait
    /// for the first one and share its outcome, a failure included, instead of reading it again.
    inflight: Mutex<std::collections::HashMap<ChunkKey, Arc<tokio::sync::OnceCell<Shared>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// The outcome of one load, shared by every reader that waited for it (the error type erased
/// so that one map serves every caller's error type).
type Shared = Result<Arc<DecodedChunk>, Arc<dyn std::any::Any + Send + Sync>>;

#[derive(Debug)]
struct Inner {
    lru: LruCache<ChunkKey, Arc<DecodedChunk>>,
    resident_bytes: u64,
}

impl ChunkCache {
    /// A cache holding at most `capacity_bytes` of decoded values (0 disables caching).
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity_bytes,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                resident_bytes: 0,
            }),
            inflight: Mutex::new(std::collections::HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The cached chunk, or the result of `load` — run once however many callers ask for the
    /// same missing chunk at the same time, and its outcome, value or error, given to each —
    /// inserted into the cache. A failure is not kept: a later caller loads again. The error is
    /// the only reference to `load`'s error when nobody else shared or kept it
    /// (`Arc::try_unwrap` gets it back).
    pub async fn get_or_load<E, F, Fut>(
        &self,
        key: ChunkKey,
        load: F,
    ) -> Result<Arc<DecodedChunk>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<DecodedChunk>, Arc<E>>>,
    {
        if let Some(hit) = self.get(&key) {
            return Ok(hit);
        }
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let outcome: Shared = cell
            .get_or_init(|| async {
                let chunk = load()
                    .await
                    .map_err(|e| e as Arc<dyn std::any::Any + Send + Sync>)?;
                self.insert(key.clone(), chunk.clone());
                Ok(chunk)
            })
            .await
            .clone();
        {
            let mut inflight = self
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
            }
        }
        drop(cell);
        outcome.map_err(|e| {
            e.downcast::<E>()
                .expect("one chunk key is loaded with one error type")
        })
    }

    /// Looks up a chunk, marking it most recently used.
    pub fn get(&self, key: &ChunkKey) -> Option<Arc<DecodedChunk>> {
        let found = self.lock().lru.get(key).cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Inserts a chunk, evicting least recently used ones until the budget holds. A chunk larger
    /// than the whole budget is not kept.
    pub fn insert(&self, key: ChunkKey, chunk: Arc<DecodedChunk>) {
        let size = chunk.bytes();
        if size > self.capacity_bytes {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.lru.put(key, chunk) {
            inner.resident_bytes -= old.bytes();
        }
        inner.resident_bytes += size;
        while inner.resident_bytes > self.capacity_bytes {
            let Some((_, evicted)) = inner.lru.pop_lru() else {
                break;
            };
            inner.resident_bytes -= evicted.bytes();
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            resident_bytes: self.lock().resident_bytes,
            capacity_bytes: self.capacity_bytes,
        }
    }

    /// Drops the cached chunks of every array whose cache name starts with `prefix` (one store
    /// as one dataset sees it); returns how many.
    pub fn remove_prefix(&self, prefix: &str) -> usize {
        let mut inner = self.lock();
        let doomed: Vec<ChunkKey> = inner
            .lru
            .iter()
            .filter(|(key, _)| key.0.starts_with(prefix))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &doomed {
            if let Some(chunk) = inner.lru.pop(key) {
                inner.resident_bytes -= chunk.bytes();
            }
        }
        doomed.len()
    }

    /// Drops every cached chunk.
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.lru.clear();
        inner.resident_bytes = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the LRU consistent (every update is a single
        // call), so a poisoned lock is still safe to use.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize) -> Arc<DecodedChunk> {
        Arc::new(DecodedChunk::new(vec![0.0; n], vec![n]))
    }

    fn key(i: u64) -> ChunkKey {
        (Arc::from("s/a"), vec![i])
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let cache = ChunkCache::new(3 * 400);
        for i in 0..3 {
            cache.insert(key(i), chunk(100));
        }
        assert!(cache.get(&key(0)).is_some()); // 0 becomes most recent
        cache.insert(key(3), chunk(100)); // evicts 1
        assert!(cache.get(&key(1)).is_none());
        assert!(cache.get(&key(0)).is_some());
        assert!(cache.get(&key(2)).is_some());
        let stats = cache.stats();
        assert_eq!(stats.resident_bytes, 1200);
        assert_eq!(stats.evictions, 1);
        assert_eq!((stats.hits, stats.misses), (3, 1));
    }

    #[test]
    fn native_bytes_are_read_as_f32_without_conversion() {
        let values = [1.5f32, -2.0, f32::NAN, 7.25];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let chunk = DecodedChunk::from_native_bytes(bytes, vec![4]);
        assert_eq!(chunk.values()[..2], values[..2]);
        assert!(chunk.values()[2].is_nan());
        assert_eq!(chunk.values()[3], 7.25);
        assert_eq!(chunk.bytes(), 16);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_of_one_chunk_load_it_once() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let loads = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load(key(9), || async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            Ok::<_, Arc<()>>(chunk(10))
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().values().len(), 10);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // A failed load is not cached: the next caller tries again.
        let err = cache
            .get_or_load(key(10), || async {
                Err::<Arc<DecodedChunk>, _>(Arc::new("boom"))
            })
            .await;
        assert_eq!(Arc::try_unwrap(err.unwrap_err()), Ok("boom"), "not shared");
        assert!(
            cache
                .get_or_load(key(10), || async { Ok::<_, Arc<&str>>(chunk(3)) })
                .await
                .is_ok()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_a_failing_chunk_share_one_load_and_its_error() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let loads = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load(key(4), || async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            Err::<Arc<DecodedChunk>, _>(Arc::new(String::from("403 on s/a/4")))
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(*t.await.unwrap().unwrap_err(), "403 on s/a/4");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for 16 readers");
        assert!(cache.get(&key(4)).is_none(), "a failure is not cached");
    }

    #[test]
    fn removing_a_prefix_drops_only_that_stores_chunks() {
        let cache = ChunkCache::new(1 << 20);
        for (name, i) in [("s/a", 0), ("s/b", 1), ("s2/a", 2), ("t/a", 3)] {
            cache.insert((Arc::from(name), vec![i]), chunk(10));
        }
        assert_eq!(cache.remove_prefix("s/"), 2);
        assert!(cache.get(&(Arc::from("s/a"), vec![0])).is_none());
        assert!(cache.get(&(Arc::from("s2/a"), vec![2])).is_some());
        assert_eq!(cache.stats().resident_bytes, 80);
    }

    #[test]
    fn oversized_chunks_are_not_kept_and_budget_always_holds() {
        let cache = ChunkCache::new(1000);
        cache.insert(key(0), chunk(1000));
        assert!(cache.get(&key(0)).is_none());
        for i in 0..50 {
            cache.insert(key(i), chunk(30 + i as usize));
            assert!(cache.stats().resident_bytes <= 1000);
        }
    }
}
