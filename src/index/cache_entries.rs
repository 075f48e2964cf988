//! The cache's record of each cached file: size, media type, last access.
//! Owned by the cache's byte budget (it evicts by last access), so pruning
//! leaves it alone.
//!
//! - `cache_entries`: digest → JSON [`CacheEntry`]
//!
//! Last-access times are batched by the caller and written here in bulk, so
//! the hit path never writes to sled.

use serde::{Deserialize, Serialize};

use super::{corrupt, IndexError, Shared};
use crate::oci::Digest;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub size: u64,
    /// The `Content-Type` the upstream sent (manifests need it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Unix milliseconds: LRU order must separate pulls within one second.
    pub last_access_ms: u64,
}

#[derive(Clone)]
pub struct CacheEntries {
    tree: sled::Tree,
    shared: Shared,
}

impl CacheEntries {
    pub(super) fn open(db: &sled::Db, shared: Shared) -> Result<Self, IndexError> {
        Ok(CacheEntries {
            tree: db.open_tree("cache_entries")?,
            shared,
        })
    }

    pub fn get(&self, digest: &Digest) -> Result<Option<CacheEntry>, IndexError> {
        match self.tree.get(digest.as_str())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Records an entry; returns whether one existed (atomically, so two
    /// commits of one digest count its bytes once).
    pub fn put(&self, digest: &Digest, e: &CacheEntry) -> Result<bool, IndexError> {
        let v = serde_json::to_vec(e).map_err(corrupt)?;
        Ok(self.tree.insert(digest.as_str(), v)?.is_some())
    }

    /// Forgets an entry (best effort: a leftover record of a missing file
    /// is dropped by the cache's next verify or lookup).
    pub fn remove(&self, digest: &Digest) {
        let r = self.tree.remove(digest.as_str());
        self.shared.best_effort("cache_entries", digest, r);
    }

    /// Applies batched last-access times (newer wins; best effort: a lost
    /// touch only makes an entry look older to eviction).
    pub fn touch(&self, touched: &[(Digest, u64)]) {
        for (d, at) in touched {
            let r = self.get(d).and_then(|found| match found {
                Some(mut e) if *at > e.last_access_ms => {
                    e.last_access_ms = *at;
                    self.put(d, &e).map(drop)
                }
                _ => Ok(()),
            });
            self.shared.best_effort("cache_entries", d, r);
        }
    }

    /// Every cache entry.
    pub fn all(&self) -> Result<Vec<(Digest, CacheEntry)>, IndexError> {
        self.tree
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let d: Digest = std::str::from_utf8(&k)
                    .map_err(corrupt)?
                    .parse()
                    .map_err(corrupt)?;
                Ok((d, serde_json::from_slice(&v).map_err(corrupt)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::CacheEntry;
    use crate::index::Index;
    use crate::oci::Digest;

    #[test]
    fn touches_move_last_access_forward_only_and_count_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let c = ix.cache_entries();
        let (d1, d2) = (Digest::sha256_of(b"1"), Digest::sha256_of(b"2"));
        let e = CacheEntry {
            size: 3,
            media_type: None,
            last_access_ms: 100,
        };
        assert!(!c.put(&d1, &e).expect("put"));
        assert!(c.put(&d1, &e).expect("put again"));
        c.touch(&[(d1.clone(), 50)]);
        assert_eq!(
            c.get(&d1).expect("get").map(|e| e.last_access_ms),
            Some(100)
        );
        c.touch(&[(d1.clone(), 200)]);
        assert_eq!(
            c.get(&d1).expect("get").map(|e| e.last_access_ms),
            Some(200)
        );
        assert_eq!(ix.write_failures(), 0);
        // A record that no longer parses (a torn or foreign value) makes
        // its touch fail: counted, not fatal, and the others still apply.
        c.tree.insert(d2.as_str(), &b"{not json"[..]).expect("raw");
        c.touch(&[(d2.clone(), 300), (d1.clone(), 300)]);
        assert_eq!(ix.write_failures(), 1);
        assert_eq!(
            c.get(&d1).expect("get").map(|e| e.last_access_ms),
            Some(300)
        );
        c.remove(&d1);
        assert_eq!(c.get(&d1).expect("get"), None);
        assert!(c.all().is_err(), "a corrupt record is reported when read");
    }
}
