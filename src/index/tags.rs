//! The last known digest of each tag, so tag pulls survive an upstream
//! outage within `cache.max_stale`. Grows with every tag pulled; pruned by
//! the age of its last confirmation.
//!
//! - `tags`: repo ∅ tag → JSON [`TagRecord`] (its `checked` is the stamp)

use serde::{Deserialize, Serialize};

use super::{corrupt, key, IndexError, Shared};
use crate::oci::{Digest, RepoName};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Unix seconds of the last upstream confirmation.
    pub checked: u64,
}

/// Tag records remembered in memory, so that a tag pull reads no sled and
/// a confirmation repeated within the same second is not rewritten.
const MEMO_CAPACITY: u64 = 65_536;

#[derive(Clone)]
pub struct TagStore {
    tree: sled::Tree,
    shared: Shared,
    memo: moka::sync::Cache<(RepoName, String), TagRecord>,
}

/// The stamp pruning judges a tag record by.
pub(super) fn checked_of(v: &[u8]) -> Option<u64> {
    serde_json::from_slice::<TagRecord>(v)
        .ok()
        .map(|r| r.checked)
}

impl TagStore {
    pub(super) fn open(db: &sled::Db, shared: Shared) -> Result<Self, IndexError> {
        Ok(TagStore {
            tree: db.open_tree("tags")?,
            shared,
            memo: moka::sync::Cache::new(MEMO_CAPACITY),
        })
    }

    /// The record of `tag` if memory holds it (no I/O; `None` means "ask
    /// [`TagStore::get`]").
    pub fn known(&self, repo: &RepoName, tag: &str) -> Option<TagRecord> {
        self.memo.get(&(repo.clone(), tag.to_string()))
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    pub fn get(&self, repo: &RepoName, tag: &str) -> Result<Option<TagRecord>, IndexError> {
        if let Some(r) = self.known(repo, tag) {
            return Ok(Some(r));
        }
        match self.tree.get(key(&[repo.as_str(), tag]))? {
            Some(v) => {
                let r: TagRecord = serde_json::from_slice(&v).map_err(corrupt)?;
                self.memo.insert((repo.clone(), tag.to_string()), r.clone());
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    /// Records what the upstream just said `tag` points at (best effort: a
    /// lost record only costs staleness cover during an outage).
    /// Drops what memory remembers (after pruning changed the tree).
    pub(super) fn forget_memo(&self) {
        self.memo.invalidate_all();
    }

    /// Forgets `tag` (deleted upstream; best effort: a record left behind
    /// is revalidated within `cache.tag_ttl` anyway).
    pub fn forget(&self, repo: &RepoName, tag: &str) {
        self.memo.invalidate(&(repo.clone(), tag.to_string()));
        let r = self.tree.remove(key(&[repo.as_str(), tag]));
        self.shared
            .best_effort("tags", &format_args!("{repo}:{tag}"), r);
    }

    pub fn set(&self, repo: &RepoName, tag: &str, r: &TagRecord) {
        if self.known(repo, tag).as_ref() == Some(r) {
            return;
        }
        self.memo.insert((repo.clone(), tag.to_string()), r.clone());
        let written = serde_json::to_vec(r)
            .map_err(corrupt)
            .and_then(|v| Ok(self.tree.insert(key(&[repo.as_str(), tag]), v)?));
        self.shared
            .best_effort("tags", &format_args!("{repo}:{tag}"), written);
    }
}

#[cfg(test)]
mod tests {
    use super::TagRecord;
    use crate::index::Index;
    use crate::oci::{Digest, RepoName};

    #[test]
    fn a_tag_record_is_kept_per_repository() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let (a, b) = (
            RepoName::parse("a").expect("n"),
            RepoName::parse("b").expect("n"),
        );
        let r = TagRecord {
            digest: Digest::sha256_of(b"m"),
            media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
            checked: 42,
        };
        ix.tags().set(&a, "v1", &r);
        assert_eq!(ix.tags().get(&a, "v1").expect("get"), Some(r));
        assert_eq!(ix.tags().get(&b, "v1").expect("get"), None);
    }
}
