//! A store rewritten while it is served. A server reads each chunk as it was the first time it
//! read it: the version of every chunk object read from storage — the object store's ETag, or
//! size, modification time and inode of a local file (or "absent") — is recorded then, and a
//! later read that finds another version fails with [`StoreError::StoreChanged`] (DATA_LOSS to
//! the stream that read it) instead of delivering new values beside old ones that the chunk
//! cache or an earlier batch holds. The chunk keeps failing until the loader is restarted, which
//! reopens the store as it is now (docs/operations.md, "A store rewritten while served").
//!
//! The first change found also drops the dataset's cached chunks, so every chunk is read, and
//! checked, again. What cannot be seen: a chunk rewritten while it sits in the cache until it
//! is read again, and a chunk the server never read (read as it is now). The record costs one
//! entry of two 64-bit hashes per chunk read.
//!
//! [`StoreError::StoreChanged`]: crate::error::StoreError::StoreChanged

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The version of one object: what a rewrite changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectVersion {
    /// The object does not exist (a missing chunk read as the fill value).
    Absent,
    /// A hash of the ETag, or of size, modification time and inode.
    Present(u64),
}

impl ObjectVersion {
    /// The version of an object-store object: its ETag, or size and modification time when the
    /// store gives none.
    pub fn of_object(meta: &object_store::ObjectMeta) -> Self {
        match &meta.e_tag {
            Some(e_tag) => Self::hashed(("etag", e_tag)),
            None => Self::hashed((
                "size+mtime",
                meta.size,
                meta.last_modified.timestamp_nanos_opt(),
            )),
        }
    }

    /// The version of a local file: size, modification time (nanoseconds) and, on Unix, inode
    /// (a file replaced by a rename within one clock tick still differs).
    pub fn of_file(meta: &std::fs::Metadata) -> Self {
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos());
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0u64;
        Self::hashed(("file", meta.len(), modified, inode))
    }

    fn hashed(what: impl Hash) -> Self {
        // SipHash with fixed keys: the same object hashes alike in every process.
        let mut hasher = DefaultHasher::new();
        what.hash(&mut hasher);
        Self::Present(hasher.finish())
    }
}

/// A chunk found changed: the version first read and the one read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub first: ObjectVersion,
    pub now: ObjectVersion,
    /// Whether this is the first time this chunk was found changed (log it, count it).
    pub first_report: bool,
    /// Whether this is the first change found in the whole store (drop its cached chunks).
    pub first_in_store: bool,
}

/// The versions a dataset first read, by chunk key.
#[derive(Debug, Default)]
pub struct VersionLedger {
    /// Hash of the store key → the version first read. A hash collision between two keys would
    /// fail reads of both with a false "store changed"; at 10⁷ chunks its odds are about 10⁻⁵.
    first: Mutex<HashMap<u64, ObjectVersion>>,
    reported: Mutex<HashSet<u64>>,
    changed: AtomicBool,
}

impl VersionLedger {
    /// Records `version` of the object `key` when it is read for the first time; a later read
    /// must find the same version.
    pub fn check(&self, key: &str, version: ObjectVersion) -> Result<(), Changed> {
        let id = {
            let mut hasher = DefaultHasher::new();
            key.hash(&mut hasher);
            hasher.finish()
        };
        let first = *lock(&self.first).entry(id).or_insert(version);
        if first == version {
            return Ok(());
        }
        let first_report = lock(&self.reported).insert(id);
        let first_in_store = !self.changed.swap(true, Ordering::Relaxed);
        Err(Changed {
            first,
            now: version,
            first_report,
            first_in_store,
        })
    }

    /// Whether any chunk was found changed.
    pub fn changed(&self) -> bool {
        self.changed.load(Ordering::Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is one call on the collection: a poisoned lock holds consistent data.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(e_tag: Option<&str>, size: u64, secs: i64) -> object_store::ObjectMeta {
        object_store::ObjectMeta {
            location: "s.zarr/z/0.0.0.0".into(),
            last_modified: chrono::DateTime::from_timestamp(secs, 0).unwrap(),
            size,
            e_tag: e_tag.map(str::to_string),
            version: None,
        }
    }

    #[test]
    fn versions_follow_the_etag_or_size_and_time() {
        let v = ObjectVersion::of_object;
        assert_eq!(
            v(&object(Some("\"a\""), 10, 1)),
            v(&object(Some("\"a\""), 10, 1))
        );
        assert_ne!(
            v(&object(Some("\"a\""), 10, 1)),
            v(&object(Some("\"b\""), 10, 1))
        );
        // The ETag decides when there is one (a copy may carry a newer time, same bytes).
        assert_eq!(
            v(&object(Some("\"a\""), 10, 1)),
            v(&object(Some("\"a\""), 10, 2))
        );
        assert_eq!(v(&object(None, 10, 1)), v(&object(None, 10, 1)));
        assert_ne!(v(&object(None, 10, 1)), v(&object(None, 11, 1)));
        assert_ne!(v(&object(None, 10, 1)), v(&object(None, 10, 2)));
        assert_ne!(v(&object(None, 10, 1)), ObjectVersion::Absent);
    }

    #[test]
    fn a_file_rewritten_in_place_with_the_same_size_is_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.0.0.0");
        std::fs::write(&path, b"old bytes").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        let at = |secs| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        file.set_modified(at(1_000)).unwrap();
        let before = ObjectVersion::of_file(&std::fs::metadata(&path).unwrap());
        assert_eq!(
            before,
            ObjectVersion::of_file(&std::fs::metadata(&path).unwrap())
        );
        std::fs::write(&path, b"new bytes").unwrap();
        file.set_modified(at(1_001)).unwrap();
        let after = ObjectVersion::of_file(&std::fs::metadata(&path).unwrap());
        assert_ne!(before, after);
        // Replaced by a rename, with the old time restored: the inode still tells.
        let other = dir.path().join("tmp");
        std::fs::write(&other, b"old bytes").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(at(1_000))
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_ne!(
            before,
            ObjectVersion::of_file(&std::fs::metadata(&path).unwrap())
        );
    }

    #[test]
    fn the_first_version_read_is_the_one_every_later_read_must_find() {
        let ledger = VersionLedger::default();
        let (a, b) = (ObjectVersion::Present(1), ObjectVersion::Present(2));
        assert_eq!(ledger.check("z/0.0.0.0", a), Ok(()));
        assert_eq!(ledger.check("z/0.0.0.0", a), Ok(()));
        assert_eq!(ledger.check("z/1.0.0.0", b), Ok(()), "each key on its own");
        assert!(!ledger.changed());
        let changed = ledger.check("z/0.0.0.0", b).unwrap_err();
        assert_eq!((changed.first, changed.now), (a, b));
        assert!(changed.first_report && changed.first_in_store);
        // Still changed on the next read (reported once), and a missing chunk that appears
        // is a change too.
        let again = ledger.check("z/0.0.0.0", b).unwrap_err();
        assert!(!again.first_report && !again.first_in_store);
        assert_eq!(ledger.check("t/0.0.0.0", ObjectVersion::Absent), Ok(()));
        let appeared = ledger.check("t/0.0.0.0", a).unwrap_err();
        assert!(appeared.first_report && !appeared.first_in_store);
        assert!(ledger.changed());
        // Rewritten back to the bytes first read: the same version, read again.
        assert_eq!(ledger.check("z/0.0.0.0", a), Ok(()));
    }
}
