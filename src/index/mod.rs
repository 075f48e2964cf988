//! The index: the only code that opens sled.
//!
//! Trees, keyed with NUL separators (names and digests never contain NUL)
//! so that one subject's referrers are a prefix scan:
//!
//! - `referrers`: repo ∅ subject ∅ referrer → descriptor JSON
//! - `by_referrer`: repo ∅ referrer ∅ subject → () (deletes find subjects)
//! - `tombstones`: repo ∅ digest → () (deleted through graft; entries of
//!   stale fallback tags must not bring them back)
//! - `rejected`: repo ∅ subject ∅ referrer → () (fallback-tag entries whose
//!   manifest did not name the subject; checked once)
//! - `fallback_seen`: repo ∅ subject → digest of the fallback tag last read
//! - `intents`: repo ∅ subject ∅ referrer → descriptor JSON, written before
//!   a subject push is forwarded, removed once index and tag are written
//! - `tag_writes`: repo ∅ subject → () (a fallback-tag write is owed)
//! - `delete_intents`: repo ∅ referrer → (), written before a `DELETE` of
//!   an indexed referrer is forwarded, removed once the index follows
//! - `cache_entries`: digest → size, media type, last access (the cache)
//! - `present`: repo ∅ digest → () (the upstream confirmed repo holds it)
//! - `tags`: repo ∅ tag → last known digest and when it was confirmed
//! - `access`: repo ∅ sha256(credentials) → when the upstream last said yes
//! - `meta`: `schema_version`
//!
//! Writes that must survive a crash are flushed before they are
//! acknowledged.

mod cache_entries;

use std::path::Path;

pub use cache_entries::{CacheEntry, TagRecord};

use crate::oci::{Descriptor, Digest, RepoName};

const SCHEMA_VERSION: &[u8] = b"1";

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("index holds unreadable data: {0}")]
    Corrupt(String),
    #[error("index at {path} is in use by another graft process (stop it first): {source}")]
    Locked { path: String, source: sled::Error },
    #[error("index schema version {found} is not supported (expected {expected})")]
    Schema { found: String, expected: String },
}

impl From<IndexError> for crate::error::Error {
    fn from(e: IndexError) -> Self {
        crate::error::Error::Internal(e.to_string())
    }
}

/// The referrers index.
#[derive(Clone)]
pub struct Index {
    db: sled::Db,
    referrers: sled::Tree,
    by_referrer: sled::Tree,
    tombstones: sled::Tree,
    rejected: sled::Tree,
    fallback_seen: sled::Tree,
    intents: sled::Tree,
    tag_writes: sled::Tree,
    cache_entries: sled::Tree,
    present: sled::Tree,
    tags: sled::Tree,
    access: sled::Tree,
    delete_intents: sled::Tree,
}

/// A push of a referrer that was announced but not yet completed.
#[derive(Debug, Clone)]
pub struct Intent {
    pub repo: RepoName,
    pub subject: Digest,
    pub descriptor: Descriptor,
}

fn key(parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// A prefix ending in the separator, so `repo` does not match `repo2`.
fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

fn split(k: &[u8]) -> Result<Vec<String>, IndexError> {
    k.split(|b| *b == 0)
        .map(|p| {
            String::from_utf8(p.to_vec()).map_err(|_| IndexError::Corrupt("non-UTF-8 key".into()))
        })
        .collect()
}

/// Whether sled failed to open because another process holds its lock.
///
/// sled 0.34 does not pass the `flock` error through: it wraps it in an
/// `ErrorKind::Other` whose only trace is the message ("could not acquire
/// lock on …: … WouldBlock …"), so the message is what can be matched.
fn is_lock_conflict(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.raw_os_error() == Some(11)
                || io.to_string().starts_with("could not acquire lock")
        }
        _ => false,
    }
}

impl Index {
    /// Opens (or creates) the index under `dir`.
    pub fn open(dir: &Path) -> Result<Index, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::Sled(e.into()))?;
        let db = sled::Config::new().path(dir).open().map_err(|e| {
            if is_lock_conflict(&e) {
                IndexError::Locked {
                    path: dir.display().to_string(),
                    source: e,
                }
            } else {
                IndexError::Sled(e)
            }
        })?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(IndexError::Schema {
                    found: String::from_utf8_lossy(&v).into_owned(),
                    expected: String::from_utf8_lossy(SCHEMA_VERSION).into_owned(),
                })
            }
        }
        Ok(Index {
            referrers: db.open_tree("referrers")?,
            by_referrer: db.open_tree("by_referrer")?,
            tombstones: db.open_tree("tombstones")?,
            rejected: db.open_tree("rejected")?,
            fallback_seen: db.open_tree("fallback_seen")?,
            intents: db.open_tree("intents")?,
            tag_writes: db.open_tree("tag_writes")?,
            cache_entries: db.open_tree("cache_entries")?,
            present: db.open_tree("present")?,
            tags: db.open_tree("tags")?,
            access: db.open_tree("access")?,
            delete_intents: db.open_tree("delete_intents")?,
            db,
        })
    }

    /// Makes every write so far durable.
    ///
    /// A blocking `flush` on the blocking pool: sled 0.34's `flush_async`
    /// never wakes some of its waiters when several flush at once
    /// (spacejam/sled#1308), which hung concurrent pushes.
    pub async fn flush(&self) -> Result<(), IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| IndexError::Corrupt(format!("flush task: {e}")))??;
        Ok(())
    }

    /// The referrers of `subject` in `repo`, ordered by digest.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<Descriptor>, IndexError> {
        self.referrers
            .scan_prefix(prefix(&[repo.as_str(), subject.as_str()]))
            .values()
            .map(|v| {
                let v = v?;
                serde_json::from_slice(&v).map_err(|e| IndexError::Corrupt(e.to_string()))
            })
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
        let value = serde_json::to_vec(d).map_err(|e| IndexError::Corrupt(e.to_string()))?;
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
        self.tombstones
            .insert(key(&[repo.as_str(), digest.as_str()]), &[])?;
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

    pub fn reject(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), IndexError> {
        self.rejected.insert(
            key(&[repo.as_str(), subject.as_str(), referrer.as_str()]),
            &[],
        )?;
        Ok(())
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
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_fallback_seen(
        &self,
        repo: &RepoName,
        subject: &Digest,
        tag_digest: &str,
    ) -> Result<(), IndexError> {
        self.fallback_seen.insert(
            key(&[repo.as_str(), subject.as_str()]),
            tag_digest.as_bytes(),
        )?;
        Ok(())
    }

    /// Records that a referrer push is about to be forwarded.
    pub fn add_intent(
        &self,
        repo: &RepoName,
        subject: &Digest,
        d: &Descriptor,
    ) -> Result<(), IndexError> {
        let value = serde_json::to_vec(d).map_err(|e| IndexError::Corrupt(e.to_string()))?;
        self.intents.insert(
            key(&[repo.as_str(), subject.as_str(), d.digest.as_str()]),
            value,
        )?;
        Ok(())
    }

    pub fn remove_intent(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<(), IndexError> {
        self.intents
            .remove(key(&[repo.as_str(), subject.as_str(), referrer.as_str()]))?;
        Ok(())
    }

    pub fn intents(&self) -> Result<Vec<Intent>, IndexError> {
        let mut out = Vec::new();
        for kv in self.intents.iter() {
            let (k, v) = kv?;
            let parts = split(&k)?;
            let (Some(repo), Some(subject)) = (parts.first(), parts.get(1)) else {
                return Err(IndexError::Corrupt("intent key".into()));
            };
            out.push(Intent {
                repo: RepoName::parse(repo).map_err(|e| IndexError::Corrupt(e.to_string()))?,
                subject: subject
                    .parse()
                    .map_err(|_| IndexError::Corrupt("intent subject".into()))?,
                descriptor: serde_json::from_slice(&v)
                    .map_err(|e| IndexError::Corrupt(e.to_string()))?,
            });
        }
        Ok(out)
    }

    /// Records that a `DELETE` of the referrer `digest` is about to be
    /// forwarded.
    pub fn add_delete_intent(&self, repo: &RepoName, digest: &Digest) -> Result<(), IndexError> {
        self.delete_intents
            .insert(key(&[repo.as_str(), digest.as_str()]), &[])?;
        Ok(())
    }

    pub fn remove_delete_intent(&self, repo: &RepoName, digest: &Digest) -> Result<(), IndexError> {
        self.delete_intents
            .remove(key(&[repo.as_str(), digest.as_str()]))?;
        Ok(())
    }

    pub fn delete_intents(&self) -> Result<Vec<(RepoName, Digest)>, IndexError> {
        let mut out = Vec::new();
        for k in self.delete_intents.iter().keys() {
            let parts = split(&k?)?;
            let (Some(repo), Some(digest)) = (parts.first(), parts.get(1)) else {
                return Err(IndexError::Corrupt("delete_intents key".into()));
            };
            out.push((
                RepoName::parse(repo).map_err(|e| IndexError::Corrupt(e.to_string()))?,
                digest
                    .parse()
                    .map_err(|_| IndexError::Corrupt("delete_intents digest".into()))?,
            ));
        }
        Ok(out)
    }

    /// Records that the fallback tag of `subject` must be rewritten.
    pub fn owe_tag_write(&self, repo: &RepoName, subject: &Digest) -> Result<(), IndexError> {
        self.tag_writes
            .insert(key(&[repo.as_str(), subject.as_str()]), &[])?;
        Ok(())
    }

    pub fn tag_write_done(&self, repo: &RepoName, subject: &Digest) -> Result<(), IndexError> {
        self.tag_writes
            .remove(key(&[repo.as_str(), subject.as_str()]))?;
        Ok(())
    }

    pub fn owed_tag_writes(&self) -> Result<Vec<(RepoName, Digest)>, IndexError> {
        let mut out = Vec::new();
        for k in self.tag_writes.iter().keys() {
            let parts = split(&k?)?;
            let (Some(repo), Some(subject)) = (parts.first(), parts.get(1)) else {
                return Err(IndexError::Corrupt("tag_writes key".into()));
            };
            out.push((
                RepoName::parse(repo).map_err(|e| IndexError::Corrupt(e.to_string()))?,
                subject
                    .parse()
                    .map_err(|_| IndexError::Corrupt("tag_writes subject".into()))?,
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(n: u8) -> Descriptor {
        serde_json::from_value(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": Digest::sha256_of(&[n]).to_string(),
            "size": 10 + n as u64,
            "artifactType": "application/vnd.example",
        }))
        .expect("descriptor")
    }

    #[test]
    fn referrers_are_scoped_by_repository_and_subject() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let a = RepoName::parse("a").expect("name");
        let a2 = RepoName::parse("a2").expect("name");
        let s = Digest::sha256_of(b"subject");
        assert!(ix.add(&a, &s, &desc(1)).expect("add"));
        assert!(!ix.add(&a, &s, &desc(1)).expect("add"));
        ix.add(&a, &s, &desc(2)).expect("add");
        ix.add(&a2, &s, &desc(3)).expect("add");
        assert_eq!(ix.referrers(&a, &s).expect("list").len(), 2);
        assert_eq!(ix.referrers(&a2, &s).expect("list").len(), 1);
        assert!(ix
            .referrers(&a, &Digest::sha256_of(b"other"))
            .expect("list")
            .is_empty());
    }

    #[test]
    fn removing_a_referrer_reports_its_subjects_and_leaves_a_tombstone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let a = RepoName::parse("a").expect("name");
        let (s1, s2) = (Digest::sha256_of(b"1"), Digest::sha256_of(b"2"));
        ix.add(&a, &s1, &desc(1)).expect("add");
        ix.add(&a, &s2, &desc(1)).expect("add");
        let mut subjects = ix.remove_referrer(&a, &desc(1).digest).expect("remove");
        subjects.sort();
        let mut want = vec![s1.clone(), s2];
        want.sort();
        assert_eq!(subjects, want);
        assert!(ix.referrers(&a, &s1).expect("list").is_empty());
        assert!(ix.is_tombstoned(&a, &desc(1).digest).expect("tomb"));
        ix.add(&a, &s1, &desc(1)).expect("re-add");
        assert!(!ix.is_tombstoned(&a, &desc(1).digest).expect("tomb"));
    }

    #[test]
    fn a_second_open_of_a_held_index_reports_it_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = Index::open(dir.path()).expect("open");
        match Index::open(dir.path()) {
            Err(IndexError::Locked { path, .. }) => {
                assert_eq!(path, dir.path().display().to_string())
            }
            Err(other) => panic!("expected Locked, got {other}"),
            Ok(_) => panic!("a held index opened twice"),
        }
    }

    #[test]
    fn intents_and_owed_writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = RepoName::parse("a/b").expect("name");
        let s = Digest::sha256_of(b"s");
        {
            let ix = Index::open(dir.path()).expect("open");
            ix.add_intent(&a, &s, &desc(7)).expect("intent");
            ix.owe_tag_write(&a, &s).expect("owe");
            ix.db.flush().expect("flush");
        }
        let ix = Index::open(dir.path()).expect("reopen");
        let intents = ix.intents().expect("intents");
        assert_eq!(intents.len(), 1);
        assert_eq!(intents[0].repo, a);
        assert_eq!(intents[0].descriptor, desc(7));
        assert_eq!(
            ix.owed_tag_writes().expect("owed"),
            vec![(a.clone(), s.clone())]
        );
        ix.remove_intent(&a, &s, &desc(7).digest).expect("rm");
        ix.tag_write_done(&a, &s).expect("done");
        assert!(ix.intents().expect("intents").is_empty());
        assert!(ix.owed_tag_writes().expect("owed").is_empty());
    }
}
