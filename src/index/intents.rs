//! Owed work, written before it starts and removed once it is done, so a
//! crash at any instant leaves a record for recovery to finish. Never
//! pruned: dropping an entry would lose a referrer the upstream accepted.
//!
//! - `intents`: repo ∅ subject ∅ referrer → descriptor JSON, written before
//!   a push with a subject is forwarded
//! - `delete_intents`: repo ∅ referrer → (), written before a `DELETE` of
//!   an indexed referrer is forwarded
//! - `tag_writes`: repo ∅ subject → () (a fallback-tag write is owed)

use super::{corrupt, key, split, IndexError};
use crate::oci::{Descriptor, Digest, RepoName};

#[derive(Clone)]
pub struct IntentStore {
    intents: sled::Tree,
    delete_intents: sled::Tree,
    tag_writes: sled::Tree,
}

/// A push of a referrer that was announced but not yet completed.
#[derive(Debug, Clone)]
pub struct Intent {
    pub repo: RepoName,
    pub subject: Digest,
    pub descriptor: Descriptor,
}

/// Reads the (repository, digest) pairs a tree is keyed by.
fn pairs(tree: &sled::Tree, what: &str) -> Result<Vec<(RepoName, Digest)>, IndexError> {
    let mut out = Vec::new();
    for k in tree.iter().keys() {
        let parts = split(&k?)?;
        let (Some(repo), Some(digest)) = (parts.first(), parts.get(1)) else {
            return Err(IndexError::Corrupt(format!("{what} key")));
        };
        out.push((
            RepoName::parse(repo).map_err(corrupt)?,
            digest
                .parse()
                .map_err(|_| IndexError::Corrupt(format!("{what} digest")))?,
        ));
    }
    Ok(out)
}

impl IntentStore {
    pub(super) fn open(db: &sled::Db) -> Result<Self, IndexError> {
        Ok(IntentStore {
            intents: db.open_tree("intents")?,
            delete_intents: db.open_tree("delete_intents")?,
            tag_writes: db.open_tree("tag_writes")?,
        })
    }

    /// Records that a referrer push is about to be forwarded.
    pub fn add_intent(
        &self,
        repo: &RepoName,
        subject: &Digest,
        d: &Descriptor,
    ) -> Result<(), IndexError> {
        let value = serde_json::to_vec(d).map_err(corrupt)?;
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

    /// Every announced push not yet settled.
    pub fn push_intents(&self) -> Result<Vec<Intent>, IndexError> {
        let mut out = Vec::new();
        for kv in self.intents.iter() {
            let (k, v) = kv?;
            let parts = split(&k)?;
            let (Some(repo), Some(subject)) = (parts.first(), parts.get(1)) else {
                return Err(IndexError::Corrupt("intent key".into()));
            };
            out.push(Intent {
                repo: RepoName::parse(repo).map_err(corrupt)?,
                subject: subject
                    .parse()
                    .map_err(|_| IndexError::Corrupt("intent subject".into()))?,
                descriptor: serde_json::from_slice(&v).map_err(corrupt)?,
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
        pairs(&self.delete_intents, "delete_intents")
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

    /// (pending push and delete intents, owed tag writes), for the status
    /// page.
    pub fn counts(&self) -> Result<(u64, u64), IndexError> {
        let pending = self.intents.len() + self.delete_intents.len();
        Ok((pending as u64, self.tag_writes.len() as u64))
    }

    pub fn owed_tag_writes(&self) -> Result<Vec<(RepoName, Digest)>, IndexError> {
        pairs(&self.tag_writes, "tag_writes")
    }
}

#[cfg(test)]
mod tests {
    use crate::index::test_support::desc;
    use crate::index::Index;
    use crate::oci::{Digest, RepoName};

    #[test]
    fn intents_and_owed_writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = RepoName::parse("a/b").expect("name");
        let s = Digest::sha256_of(b"s");
        {
            let ix = Index::open(dir.path()).expect("open");
            ix.intents().add_intent(&a, &s, &desc(7)).expect("intent");
            ix.intents().owe_tag_write(&a, &s).expect("owe");
            ix.intents()
                .add_delete_intent(&a, &desc(8).digest)
                .expect("delete");
            ix.db.flush().expect("flush");
        }
        let ix = Index::open(dir.path()).expect("reopen");
        let i = ix.intents();
        let intents = i.push_intents().expect("intents");
        assert_eq!(intents.len(), 1);
        assert_eq!(intents[0].repo, a);
        assert_eq!(intents[0].descriptor, desc(7));
        assert_eq!(
            i.owed_tag_writes().expect("owed"),
            vec![(a.clone(), s.clone())]
        );
        assert_eq!(
            i.delete_intents().expect("deletes"),
            vec![(a.clone(), desc(8).digest)]
        );
        i.remove_intent(&a, &s, &desc(7).digest).expect("rm");
        i.tag_write_done(&a, &s).expect("done");
        i.remove_delete_intent(&a, &desc(8).digest).expect("rm");
        assert!(i.push_intents().expect("intents").is_empty());
        assert!(i.owed_tag_writes().expect("owed").is_empty());
        assert!(i.delete_intents().expect("deletes").is_empty());
    }
}
