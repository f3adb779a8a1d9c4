//! Reading one chunk of a dataset: through the shared cache, where concurrent readers share one
//! read and its outcome; from storage with its version checked against the one first read
//! ([`crate::store::version`]); a missing chunk filled or refused ([`crate::store::missing`]);
//! decoded on the rayon pool. Remote reads of one object are shared below too
//! ([`crate::store::location`]), and a refused object is not asked for again at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::{Result, StoreError};
use crate::store::cache::DecodedChunk;
use crate::store::dataset::{Dataset, Variable};
use crate::store::decode::{decode_chunk, run_on_rayon};
use crate::store::missing::MissingChunks;
use crate::store::version::{Changed, ObjectVersion};

impl Dataset {
    /// Fetches one chunk of `node` (through the cache) and decodes it to physical values.
    pub async fn chunk(&self, variable: &Variable, indices: &[u64]) -> Result<Arc<DecodedChunk>> {
        let key = (self.cache_key(&variable.node), indices.to_vec());
        let load = || async {
            self.fetch_and_decode(variable, indices)
                .await
                .map_err(Arc::new)
        };
        self.cache
            .get_or_load(key, load)
            .await
            .map_err(StoreError::unshare)
    }

    async fn fetch_and_decode(
        &self,
        variable: &Variable,
        indices: &[u64],
    ) -> Result<Arc<DecodedChunk>> {
        let store_key = variable.node.array.chunk_key(indices).to_string();
        let node = variable.node.clone();
        let packing = variable.packing.clone();
        let url = self.url().to_string();
        let chunk_indices = indices.to_vec();
        let started = std::time::Instant::now();
        let refuse_missing = self.missing.mode == MissingChunks::Error;
        let versions = self.versions.clone();
        let outcome = match self.location.local_root() {
            // A local chunk is read on the rayon thread that decodes it, into a buffer that
            // thread keeps (see `location::read_local`).
            Some(root) => {
                thread_local! {
                    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                let root = root.clone();
                run_on_rayon(move || {
                    READ_BUFFER.with_borrow_mut(|buf| {
                        let version =
                            crate::store::location::read_local(&root, &url, &store_key, buf)?;
                        let found = version.is_some();
                        if let Err(changed) =
                            versions.check(&store_key, version.unwrap_or(ObjectVersion::Absent))
                        {
                            return Ok(Fetched::Changed(changed));
                        }
                        if !found && refuse_missing {
                            return Ok(Fetched::Refused);
                        }
                        let encoded = found.then_some(buf.as_slice());
                        let decoded = decode_chunk(
                            &url,
                            &node,
                            &store_key,
                            &chunk_indices,
                            encoded,
                            &packing,
                        )?;
                        Ok::<_, StoreError>(Fetched::Decoded(found.then_some(buf.len()), decoded))
                    })
                })
                .await??
            }
            None => {
                let read = self.location.get_versioned(&store_key).await?;
                let version = read.as_ref().map_or(ObjectVersion::Absent, |(_, v)| *v);
                let encoded = read.map(|(bytes, _)| bytes);
                let fetched = encoded.as_ref().map(|bytes| bytes.len());
                if let Err(changed) = versions.check(&store_key, version) {
                    Fetched::Changed(changed)
                } else if fetched.is_none() && refuse_missing {
                    Fetched::Refused
                } else {
                    let decoded = run_on_rayon(move || {
                        decode_chunk(
                            &url,
                            &node,
                            &store_key,
                            &chunk_indices,
                            encoded.as_deref(),
                            &packing,
                        )
                    })
                    .await??;
                    Fetched::Decoded(fetched, decoded)
                }
            }
        };
        let key = || variable.node.array.chunk_key(indices).to_string();
        let (fetched, decoded) = match outcome {
            Fetched::Decoded(fetched, decoded) => (fetched, decoded),
            Fetched::Refused => {
                return Err(self
                    .missing
                    .refused(self.url(), &variable.node.name, &key()));
            }
            Fetched::Changed(changed) => {
                return Err(self.store_changed(&variable.node.name, &key(), changed));
            }
        };
        if fetched.is_none() {
            self.missing.filled(self.url(), &variable.node.name, &key());
        }
        if let Some(log) = self
            .fetch_log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            log.push((variable.name.clone(), indices.to_vec()));
        }
        if let Some(len) = fetched {
            self.counters
                .fetched_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            self.counters.fetched_chunks.fetch_add(1, Ordering::Relaxed);
            self.counters.fetch_requests.fetch_add(1, Ordering::Relaxed);
        }
        self.counters
            .decode_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.counters.decoded_bytes.fetch_add(
            std::mem::size_of_val(decoded.values()) as u64,
            Ordering::Relaxed,
        );
        Ok(Arc::new(decoded))
    }

    /// The error for a chunk found changed under the server; the first change logged, counted
    /// and answered by dropping the dataset's cached chunks, so none of them is served again
    /// unchecked beside the new ones.
    pub(crate) fn store_changed(&self, array: &str, key: &str, changed: Changed) -> StoreError {
        let dataset = self.missing.dataset(self.url()).to_string();
        if changed.first_in_store {
            let dropped = self.cache.remove_prefix(&format!("{}/", self.cache_id));
            tracing::warn!(
                dataset,
                store = self.url(),
                dropped,
                "store changed under the server: its cached chunks are dropped; restart the loader to serve the store as it is now"
            );
        }
        if changed.first_report {
            tracing::warn!(
                dataset,
                array,
                chunk = key,
                store = self.url(),
                first = ?changed.first,
                now = ?changed.now,
                "store changed: chunk is not the version first read; its reads fail"
            );
            metrics::counter!("atmorep_store_changes_total", "dataset" => dataset.clone())
                .increment(1);
        }
        StoreError::StoreChanged {
            dataset,
            array: array.to_string(),
            key: key.to_string(),
        }
    }
}

/// What a read of one chunk from storage found.
enum Fetched {
    /// Decoded values, with the encoded size (`None`: missing, read as the fill value).
    Decoded(Option<usize>, DecodedChunk),
    /// Missing under `missing_chunks = "error"`.
    Refused,
    /// Not the version first read.
    Changed(Changed),
}
