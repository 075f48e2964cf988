//! Which repositories the upstream confirmed hold a digest: with a fresh
//! yes for the client, a cache hit needs no upstream round trip, and while
//! the upstream is down it is what lets cached pulls go on. Grows with every
//! (repository, digest) pulled; pruned by the age of the confirmation.
//!
//! Each record carries when the upstream last confirmed it, so a caller
//! can ask for a confirmation younger than a window: the cache serves a
//! manifest without asking only on one younger than `cache.auth_ttl`, so
//! content deleted straight at the registry is served for at most that long.
//!
//! - `present`: repo ∅ digest → stamp of the last confirmation

use std::time::Duration;

use super::{key, stamp, stamp_of, IndexError, Shared};
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

    /// Whether the upstream confirmed `repo` holds `digest` less than
    /// `window` ago (memory first, then sled: call off the async workers
    /// unless [`PresentStore::known_within`] already said yes).
    pub fn contains_within(
        &self,
        repo: &RepoName,
        digest: &Digest,
        window: Duration,
    ) -> Result<bool, IndexError> {
        if self.known_within(repo, digest, window) {
            return Ok(true);
        }
        let at = self
            .tree
            .get(key(&[repo.as_str(), digest.as_str()]))?
            .and_then(|v| stamp_of(&v));
        Ok(at.is_some_and(|at| self.younger_than(at, window)))
    }

    /// Whether memory alone knows a confirmation younger than `window` (no
    /// I/O; `false` means "ask [`PresentStore::contains_within`]").
    pub fn known_within(&self, repo: &RepoName, digest: &Digest, window: Duration) -> bool {
        self.memo
            .get(&(repo.clone(), digest.clone()))
            .is_some_and(|at| self.younger_than(at, window))
    }

    fn younger_than(&self, at_secs: u64, window: Duration) -> bool {
        self.shared.now_secs().saturating_sub(at_secs) < window.as_secs()
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

    #[test]
    fn a_confirmation_counts_within_a_window_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = crate::clock::Clock::skewable();
        let ix = Index::open_with(dir.path(), clock.clone(), 1 << 20).expect("open");
        let p = ix.present();
        let a = RepoName::parse("a").expect("n");
        let d = Digest::sha256_of(b"d");
        let window = std::time::Duration::from_secs(60);
        p.mark(&a, &d);
        assert!(p.known_within(&a, &d, window));
        assert!(p.contains_within(&a, &d, window).expect("read"));
        clock.advance(std::time::Duration::from_secs(61));
        assert!(!p.known_within(&a, &d, window), "memory: too old");
        p.forget_memo();
        assert!(
            !p.contains_within(&a, &d, window).expect("read"),
            "sled: too old"
        );
        assert!(p.contains(&a, &d).expect("read"), "the record itself stays");
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
