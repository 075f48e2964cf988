//! What graft knows about referrers, and what it learned not to relearn.
//!
//! - `referrers`: repo ∅ subject ∅ referrer → descriptor JSON (the data;
//!   never pruned)
//! - `by_referrer`: repo ∅ referrer ∅ subject → () (deletes find subjects)
//! - `tombstones`: repo ∅ digest → stamp (deleted through graft, or found
//!   gone upstream by a HEAD: entries of stale fallback tags must not bring
//!   them back)
//! - `rejected`: repo ∅ subject ∅ referrer → stamp (fallback-tag entries
//!   whose manifest did not name the subject; checked once)
//! - `fallback_seen`: repo ∅ subject → stamp ++ digest of the fallback tag
//!   last read (a query skips the GET while the tag is unchanged)

use super::{corrupt, key, prefix, split, stamp, IndexError, Shared};
use crate::oci::{Descriptor, Digest, RepoName};

#[derive(Clone)]
pub struct ReferrerStore {
    referrers: sled::Tree,
    by_referrer: sled::Tree,
    tombstones: sled::Tree,
    rejected: sled::Tree,
    fallback_seen: sled::Tree,
    shared: Shared,
}

impl ReferrerStore {
    pub(super) fn open(db: &sled::Db, shared: Shared) -> Result<Self, IndexError> {
        Ok(ReferrerStore {
            referrers: db.open_tree("referrers")?,
            by_referrer: db.open_tree("by_referrer")?,
            tombstones: db.open_tree("tombstones")?,
            rejected: db.open_tree("rejected")?,
            fallback_seen: db.open_tree("fallback_seen")?,
            shared,
        })
    }

    pub(super) fn tombstones_tree(&self) -> &sled::Tree {
        &self.tombstones
    }

    pub(super) fn rejected_tree(&self) -> &sled::Tree {
        &self.rejected
    }

    pub(super) fn fallback_seen_tree(&self) -> &sled::Tree {
        &self.fallback_seen
    }

    /// (subjects with referrers, referrers) indexed: one pass over the
    /// keys, which are sorted, so a subject's entries are adjacent. For the
    /// status page, which counts at most every few seconds.
    pub fn counts(&self) -> Result<(u64, u64), IndexError> {
        let (mut subjects, mut referrers) = (0, 0);
        let mut last: Option<Vec<u8>> = None;
        for k in self.referrers.iter().keys() {
            let k = k?;
            // repo ∅ subject ∅ referrer: the subject's prefix ends at the
            // last separator.
            let cut = k.iter().rposition(|b| *b == 0).unwrap_or(k.len());
            referrers += 1;
            if last.as_deref() != Some(&k[..cut]) {
                subjects += 1;
                last = Some(k[..cut].to_vec());
            }
        }
        Ok((subjects, referrers))
    }

    /// The referrers of `subject` in `repo`, ordered by digest.
    pub fn list(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<Descriptor>, IndexError> {
        self.referrers
            .scan_prefix(prefix(&[repo.as_str(), subject.as_str()]))
            .values()
            .map(|v| serde_json::from_slice(&v?).map_err(corrupt))
            .collect()
    }

    pub fn contains(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<bool, IndexError> {
        Ok(self.referrers.contains_key(key(&[
            repo.as_str(),
            subject.as_str(),
            referrer.as_str(),
        ]))?)
    }

    /// Adds (or replaces) a referrer. Returns whether it was new. Clears a
    /// tombstone: the digest was pushed again.
    pub fn add(
        &self,
        repo: &RepoName,
        subject: &Digest,
        d: &Descriptor,
    ) -> Result<bool, IndexError> {
        let value = serde_json::to_vec(d).map_err(corrupt)?;
        let prev = self.referrers.insert(
            key(&[repo.as_str(), subject.as_str(), d.digest.as_str()]),
            value,
        )?;
        self.by_referrer.insert(
            key(&[repo.as_str(), d.digest.as_str(), subject.as_str()]),
            &[],
        )?;
        self.tombstones
            .remove(key(&[repo.as_str(), d.digest.as_str()]))?;
        Ok(prev.is_none())
    }

    /// Like [`ReferrerStore::add`] for a referrer found present by an
    /// upstream check made at `checked_at` (recovery's HEAD, ingestion's
    /// fetch): a delete through graft stamped at or after that check wins,
    /// so a check that raced a delete cannot bring the referrer back.
    /// Returns whether it was new (never when the delete won).
    pub fn add_unless_deleted_since(
        &self,
        repo: &RepoName,
        subject: &Digest,
        d: &Descriptor,
        checked_at: u64,
    ) -> Result<bool, IndexError> {
        let deleted_at = self
            .tombstones
            .get(key(&[repo.as_str(), d.digest.as_str()]))?
            .and_then(|v| super::stamp_of(&v));
        if deleted_at.is_some_and(|at| at >= checked_at) {
            return Ok(false);
        }
        self.add(repo, subject, d)
    }

    /// Removes `digest` as a referrer of every subject in `repo` and
    /// remembers it was deleted. Returns the subjects it referred to.
    pub fn remove_referrer(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Vec<Digest>, IndexError> {
        let subjects = self.subjects_of(repo, digest)?;
        for subject in &subjects {
            self.referrers
                .remove(key(&[repo.as_str(), subject.as_str(), digest.as_str()]))?;
            self.by_referrer
                .remove(key(&[repo.as_str(), digest.as_str(), subject.as_str()]))?;
        }
        self.tombstones.insert(
            key(&[repo.as_str(), digest.as_str()]),
            &stamp(self.shared.now_secs()),
        )?;
        Ok(subjects)
    }

    /// The subjects `digest` is indexed as a referrer of.
    pub fn subjects_of(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Digest>, IndexError> {
        let mut out = Vec::new();
        for k in self
            .by_referrer
            .scan_prefix(prefix(&[repo.as_str(), digest.as_str()]))
            .keys()
        {
            let parts = split(&k?)?;
            out.push(
                parts
                    .get(2)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| IndexError::Corrupt("by_referrer key".into()))?,
            );
        }
        Ok(out)
    }

    pub fn is_tombstoned(&self, repo: &RepoName, digest: &Digest) -> Result<bool, IndexError> {
        Ok(self
            .tombstones
            .contains_key(key(&[repo.as_str(), digest.as_str()]))?)
    }

    pub fn is_rejected(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<bool, IndexError> {
        Ok(self.rejected.contains_key(key(&[
            repo.as_str(),
            subject.as_str(),
            referrer.as_str(),
        ]))?)
    }

    /// Remembers that `referrer` does not refer to `subject` (best effort:
    /// forgetting it costs one more check).
    pub fn reject(&self, repo: &RepoName, subject: &Digest, referrer: &Digest) {
        let r = self.rejected.insert(
            key(&[repo.as_str(), subject.as_str(), referrer.as_str()]),
            &stamp(self.shared.now_secs()),
        );
        self.shared
            .best_effort("rejected", &format_args!("{repo} {subject} {referrer}"), r);
    }

    /// The digest of the fallback tag graft last read for `subject`.
    pub fn fallback_seen(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Option<String>, IndexError> {
        Ok(self
            .fallback_seen
            .get(key(&[repo.as_str(), subject.as_str()]))?
            .and_then(|v| v.get(8..).map(|d| String::from_utf8_lossy(d).into_owned())))
    }

    /// Remembers the digest of the fallback tag just read or written (best
    /// effort: forgetting it costs one more GET of the tag).
    pub fn set_fallback_seen(&self, repo: &RepoName, subject: &Digest, tag_digest: &str) {
        let mut v = stamp(self.shared.now_secs()).to_vec();
        v.extend_from_slice(tag_digest.as_bytes());
        let r = self
            .fallback_seen
            .insert(key(&[repo.as_str(), subject.as_str()]), v);
        self.shared
            .best_effort("fallback_seen", &format_args!("{repo} {subject}"), r);
    }
}

#[cfg(test)]
mod tests {
    use crate::index::test_support::desc;
    use crate::index::Index;
    use crate::oci::{Digest, RepoName};

    #[test]
    fn referrers_are_scoped_by_repository_and_subject() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let r = ix.referrers();
        let a = RepoName::parse("a").expect("name");
        let a2 = RepoName::parse("a2").expect("name");
        let s = Digest::sha256_of(b"subject");
        assert!(r.add(&a, &s, &desc(1)).expect("add"));
        assert!(!r.add(&a, &s, &desc(1)).expect("add"));
        r.add(&a, &s, &desc(2)).expect("add");
        r.add(&a2, &s, &desc(3)).expect("add");
        assert_eq!(r.list(&a, &s).expect("list").len(), 2);
        assert_eq!(r.list(&a2, &s).expect("list").len(), 1);
        assert!(r
            .list(&a, &Digest::sha256_of(b"other"))
            .expect("list")
            .is_empty());
    }

    #[test]
    fn removing_a_referrer_reports_its_subjects_and_leaves_a_tombstone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let r = ix.referrers();
        let a = RepoName::parse("a").expect("name");
        let (s1, s2) = (Digest::sha256_of(b"1"), Digest::sha256_of(b"2"));
        r.add(&a, &s1, &desc(1)).expect("add");
        r.add(&a, &s2, &desc(1)).expect("add");
        let mut subjects = r.remove_referrer(&a, &desc(1).digest).expect("remove");
        subjects.sort();
        let mut want = vec![s1.clone(), s2];
        want.sort();
        assert_eq!(subjects, want);
        assert!(r.list(&a, &s1).expect("list").is_empty());
        assert!(r.is_tombstoned(&a, &desc(1).digest).expect("tomb"));
        r.add(&a, &s1, &desc(1)).expect("re-add");
        assert!(!r.is_tombstoned(&a, &desc(1).digest).expect("tomb"));
    }

    #[test]
    fn a_delete_after_an_upstream_check_wins_over_what_the_check_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = crate::clock::Clock::skewable();
        let ix = Index::open_with(dir.path(), clock.clone(), 1 << 20).expect("open");
        let r = ix.referrers();
        let a = RepoName::parse("a").expect("name");
        let s = Digest::sha256_of(b"s");
        r.add(&a, &s, &desc(1)).expect("add");
        // Recovery checked (HEAD 200) at t, then a client deleted it at t.
        let checked_at = clock.now_secs();
        r.remove_referrer(&a, &desc(1).digest).expect("remove");
        let new = r
            .add_unless_deleted_since(&a, &s, &desc(1), checked_at)
            .expect("add");
        assert!(!new);
        assert!(r.list(&a, &s).expect("list").is_empty());
        assert!(r.is_tombstoned(&a, &desc(1).digest).expect("tomb"));
        // A check made after the delete found it again (pushed anew).
        clock.advance(std::time::Duration::from_secs(1));
        let new = r
            .add_unless_deleted_since(&a, &s, &desc(1), clock.now_secs())
            .expect("add");
        assert!(new);
        assert_eq!(r.list(&a, &s).expect("list").len(), 1);
    }

    #[test]
    fn rejections_and_seen_tags_are_remembered_per_subject() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let r = ix.referrers();
        let a = RepoName::parse("a").expect("name");
        let (s1, s2) = (Digest::sha256_of(b"1"), Digest::sha256_of(b"2"));
        r.reject(&a, &s1, &desc(1).digest);
        assert!(r.is_rejected(&a, &s1, &desc(1).digest).expect("read"));
        assert!(!r.is_rejected(&a, &s2, &desc(1).digest).expect("read"));
        assert_eq!(r.fallback_seen(&a, &s1).expect("read"), None);
        r.set_fallback_seen(&a, &s1, "sha256:abc");
        assert_eq!(
            r.fallback_seen(&a, &s1).expect("read").as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(ix.write_failures(), 0);
    }
}
