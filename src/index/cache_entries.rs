//! The cache's records in the index: one entry per cached file (size, media
//! type, last access), which repositories the upstream confirmed hold a
//! digest, and the last known digest of each tag.
//!
//! Last-access times are batched by the caller and written here in bulk, so
//! the hit path never writes to sled.

use serde::{Deserialize, Serialize};

use super::{key, Index, IndexError};
use crate::oci::{Digest, RepoName};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub size: u64,
    /// The `Content-Type` the upstream sent (manifests need it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Unix milliseconds: LRU order must separate pulls within one second.
    pub last_access_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Unix seconds of the last upstream confirmation.
    pub checked: u64,
}

fn corrupt(e: impl std::fmt::Display) -> IndexError {
    IndexError::Corrupt(e.to_string())
}

impl Index {
    pub fn cache_entry(&self, digest: &Digest) -> Result<Option<CacheEntry>, IndexError> {
        match self.cache_entries.get(digest.as_str())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Records an entry; returns whether one existed (atomically, so two
    /// commits of one digest count its bytes once).
    pub fn put_cache_entry(&self, digest: &Digest, e: &CacheEntry) -> Result<bool, IndexError> {
        let v = serde_json::to_vec(e).map_err(corrupt)?;
        Ok(self.cache_entries.insert(digest.as_str(), v)?.is_some())
    }

    pub fn remove_cache_entry(&self, digest: &Digest) -> Result<(), IndexError> {
        self.cache_entries.remove(digest.as_str())?;
        Ok(())
    }

    /// Applies batched last-access times (newer wins).
    pub fn touch_cache_entries(&self, touched: &[(Digest, u64)]) -> Result<(), IndexError> {
        for (d, at) in touched {
            if let Some(mut e) = self.cache_entry(d)? {
                if *at > e.last_access_ms {
                    e.last_access_ms = *at;
                    self.put_cache_entry(d, &e)?;
                }
            }
        }
        Ok(())
    }

    /// Every cache entry.
    pub fn cache_entries(&self) -> Result<Vec<(Digest, CacheEntry)>, IndexError> {
        self.cache_entries
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

    /// The upstream confirmed `repo` holds `digest`.
    pub fn mark_present(&self, repo: &RepoName, digest: &Digest) -> Result<(), IndexError> {
        self.present
            .insert(key(&[repo.as_str(), digest.as_str()]), &[])?;
        Ok(())
    }

    pub fn is_present(&self, repo: &RepoName, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self
            .present
            .contains_key(key(&[repo.as_str(), digest.as_str()]))?)
    }

    /// Forgets that `repo` holds `digest` (deleted upstream).
    pub fn forget_present(&self, repo: &RepoName, digest: &Digest) -> Result<(), IndexError> {
        self.present
            .remove(key(&[repo.as_str(), digest.as_str()]))?;
        Ok(())
    }

    pub fn tag(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>, IndexError> {
        match self.tags.get(key(&[repo.as_str(), tag]))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    pub fn set_tag(&self, repo: &RepoName, tag: &str, r: &TagRecord) -> Result<(), IndexError> {
        let v = serde_json::to_vec(r).map_err(corrupt)?;
        self.tags.insert(key(&[repo.as_str(), tag]), v)?;
        Ok(())
    }

    /// The upstream said yes to credentials (known by their hash only) on
    /// `repo` at `at_secs`: kept so that cached pulls keep working offline
    /// across a restart, within `cache.max_stale`.
    pub fn remember_access(
        &self,
        repo: &RepoName,
        cred: &[u8; 32],
        at_secs: u64,
    ) -> Result<(), IndexError> {
        self.access.insert(
            key(&[repo.as_str(), &hex::encode(cred)]),
            &at_secs.to_be_bytes(),
        )?;
        Ok(())
    }

    pub fn access_remembered(&self, repo: &RepoName, cred: &[u8; 32]) -> Option<u64> {
        let v = self
            .access
            .get(key(&[repo.as_str(), &hex::encode(cred)]))
            .ok()??;
        Some(u64::from_be_bytes(v.as_ref().try_into().ok()?))
    }

    pub fn forget_access(&self, repo: &RepoName, cred: &[u8; 32]) -> Result<(), IndexError> {
        self.access
            .remove(key(&[repo.as_str(), &hex::encode(cred)]))?;
        Ok(())
    }
}
