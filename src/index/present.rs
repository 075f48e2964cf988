//! Which repositories the upstream confirmed hold a digest: with a fresh
//! yes for the client, a cache hit needs no upstream round trip, and while
//! the upstream is down it is what lets cached pulls go on. Grows with every
//! (repository, digest) pulled; pruned by the age of the confirmation.
//!
//! - `present`: repo ∅ digest → stamp of the last confirmation

use std::time::Duration;

use super::{key, stamp, IndexError, Shared};
use crate::oci::{Digest, RepoName};

/// Confirmations remembered in memory (with their stamp), so that the hit
/// path asks sled nothing and a confirmation repeated within the same
/// second is not rewritten.
const MEMO_CAPACITY: u64 = 65_536;
/// How long a confirmation stays in memory without being repeated.
const MEMO_TTL: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct PresentStore {
    tree: sled::Tree,
    shared: Shared,
    memo: moka::sync::Cache<(RepoName, Digest), u64>,
}

impl PresentStore {
    pub(super) fn open(db: &sled::Db, shared: Shared) -> Result<Self, IndexError> {
        Ok(PresentStore {
            tree: db.open_tree("present")?,
            shared,
            memo: moka::sync::Cache::builder()
                .max_capacity(MEMO_CAPACITY)
                .time_to_live(MEMO_TTL)
                .build(),
        })
    }

    /// Whether memory alone knows `repo` holds `digest` (no I/O; `false`
    /// means "ask [`PresentStore::contains`]", not "absent").
    pub fn known(&self, repo: &RepoName, digest: &Digest) -> bool {
        self.memo.contains_key(&(repo.clone(), digest.clone()))
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The upstream confirmed `repo` holds `digest` (best effort: a lost
    /// mark costs one HEAD).
    pub fn mark(&self, repo: &RepoName, digest: &Digest) {
        let now = self.shared.now_secs();
        let k = (repo.clone(), digest.clone());
        if self.memo.get(&k) == Some(now) {
            return;
        }
        self.memo.insert(k, now);
        let r = self
            .tree
            .insert(key(&[repo.as_str(), digest.as_str()]), &stamp(now));
        self.shared
            .best_effort("present", &format_args!("{repo}@{digest}"), r);
    }

    pub fn contains(&self, repo: &RepoName, digest: &Digest) -> Result<bool, IndexError> {
        if self.known(repo, digest) {
            return Ok(true);
        }
        Ok(self
            .tree
            .contains_key(key(&[repo.as_str(), digest.as_str()]))?)
    }

    /// Whether `mark` would write nothing now (confirmed this second).
    pub fn marked_now(&self, repo: &RepoName, digest: &Digest) -> bool {
        self.memo.get(&(repo.clone(), digest.clone())) == Some(self.shared.now_secs())
    }

    /// Drops what memory remembers (after pruning changed the tree).
    pub(super) fn forget_memo(&self) {
        self.memo.invalidate_all();
    }

    /// Forgets that `repo` holds `digest` (deleted upstream; best effort:
    /// the next check asks the upstream anyway unless a yes is fresh).
    pub fn forget(&self, repo: &RepoName, digest: &Digest) {
        self.memo.invalidate(&(repo.clone(), digest.clone()));
        let r = self.tree.remove(key(&[repo.as_str(), digest.as_str()]));
        self.shared
            .best_effort("present", &format_args!("{repo}@{digest}"), r);
    }
}

#[cfg(test)]
mod tests {
    use crate::index::Index;
    use crate::oci::{Digest, RepoName};

    #[test]
    fn presence_is_marked_and_forgotten_per_repository() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let p = ix.present();
        let (a, b) = (
            RepoName::parse("a").expect("n"),
            RepoName::parse("b").expect("n"),
        );
        let d = Digest::sha256_of(b"d");
        p.mark(&a, &d);
        assert!(p.contains(&a, &d).expect("read"));
        assert!(!p.contains(&b, &d).expect("read"));
        p.forget(&a, &d);
        assert!(!p.contains(&a, &d).expect("read"));
    }

    /// A real storage fault: sled refuses writes to a tree that was dropped
    /// from the database under it.
    #[test]
    fn a_failed_best_effort_write_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        ix.db.drop_tree("present").expect("drop tree");
        let a = RepoName::parse("a").expect("n");
        ix.present().mark(&a, &Digest::sha256_of(b"d"));
        assert_eq!(ix.write_failures(), 1);
    }
}
