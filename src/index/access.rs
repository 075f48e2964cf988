//! When the upstream last said yes to a client's credentials on a
//! repository, so cached pulls keep working offline across a restart
//! within `cache.max_stale`. Credentials are known by their HMAC
//! ([`CredKey`]) only. Grows with every (repository, credentials) pair;
//! pruned by the age of the yes.
//!
//! - `access`: repo ∅ hex(HMAC of the credentials) → stamp of the yes,
//!   then (8 more bytes, only for a token with an `exp`) that expiry: a yes
//!   never stands past it. A value of 8 bytes (written before expiries were
//!   kept) reads as "no expiry".

use super::{key, stamp, stamp_of, IndexError, Shared};
use crate::credentials::CredKey;
use crate::oci::RepoName;

#[derive(Clone)]
pub struct AccessStore {
    tree: sled::Tree,
    shared: Shared,
}

impl AccessStore {
    pub(super) fn open(db: &sled::Db, shared: Shared) -> Result<Self, IndexError> {
        Ok(AccessStore {
            tree: db.open_tree("access")?,
            shared,
        })
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The upstream said yes to `cred` on `repo` at `at_secs` (best effort:
    /// a lost yes only matters after a restart during an outage).
    pub fn remember(&self, repo: &RepoName, cred: &CredKey, at_secs: u64) {
        self.remember_until(repo, cred, at_secs, None);
    }

    /// As [`AccessStore::remember`], for credentials that expire at
    /// `until_secs` (a token's `exp`).
    pub fn remember_until(
        &self,
        repo: &RepoName,
        cred: &CredKey,
        at_secs: u64,
        until_secs: Option<u64>,
    ) {
        let mut value = stamp(at_secs).to_vec();
        value.extend(until_secs.map(stamp).iter().flatten());
        let r = self
            .tree
            .insert(key(&[repo.as_str(), &hex::encode(cred)]), value);
        // The repository only: the key is derived from credentials.
        self.shared.best_effort("access", repo, r);
    }

    /// When the upstream last said yes to `cred` on `repo`, if it did.
    pub fn remembered(&self, repo: &RepoName, cred: &CredKey) -> Result<Option<u64>, IndexError> {
        Ok(self.remembered_until(repo, cred)?.map(|(at, _)| at))
    }

    /// When the upstream last said yes to `cred` on `repo`, and when the
    /// credentials expire, if they do.
    pub fn remembered_until(
        &self,
        repo: &RepoName,
        cred: &CredKey,
    ) -> Result<Option<(u64, Option<u64>)>, IndexError> {
        Ok(self
            .tree
            .get(key(&[repo.as_str(), &hex::encode(cred)]))?
            .and_then(|v| Some((stamp_of(&v)?, v.get(8..).and_then(stamp_of)))))
    }

    /// Forgets a yes (the upstream now says no; best effort: a no is never
    /// overridden by a remembered yes while the upstream answers).
    pub fn forget(&self, repo: &RepoName, cred: &CredKey) {
        let r = self.tree.remove(key(&[repo.as_str(), &hex::encode(cred)]));
        self.shared.best_effort("access", repo, r);
    }
}

#[cfg(test)]
mod tests {
    use crate::index::Index;
    use crate::oci::RepoName;

    #[test]
    fn a_yes_is_remembered_per_repository_and_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let a = RepoName::parse("a").expect("n");
        let (c1, c2) = ([1u8; 32], [2u8; 32]);
        ix.access().remember(&a, &c1, 1_000);
        assert_eq!(ix.access().remembered(&a, &c1).expect("read"), Some(1_000));
        assert_eq!(ix.access().remembered(&a, &c2).expect("read"), None);
        ix.access().forget(&a, &c1);
        assert_eq!(ix.access().remembered(&a, &c1).expect("read"), None);
    }

    #[test]
    fn a_token_expiry_is_kept_with_the_yes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let a = RepoName::parse("a").expect("n");
        let (c1, c2) = ([1u8; 32], [2u8; 32]);
        ix.access().remember_until(&a, &c1, 1_000, Some(1_300));
        ix.access().remember(&a, &c2, 1_000);
        let read = |c| ix.access().remembered_until(&a, c).expect("read");
        assert_eq!(read(&c1), Some((1_000, Some(1_300))));
        assert_eq!(read(&c2), Some((1_000, None)));
        assert_eq!(ix.access().remembered(&a, &c1).expect("read"), Some(1_000));
    }
}
