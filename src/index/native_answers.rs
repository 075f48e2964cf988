//! The last referrers answer of an upstream that serves the referrers API
//! itself, per (repository, subject, filter), so that `notation verify` or
//! `cosign verify` through graft keeps working while the upstream is
//! unreachable (within `referrers.max_stale`). Grows with every subject
//! queried; pruned by age and count.
//!
//! - `native_answers`: repo ∅ subject ∅ filter → stamp (8 bytes) + the
//!   image index graft answered with

use bytes::Bytes;

use super::{key, stamp, stamp_of, IndexError, Shared};
use crate::oci::{Digest, RepoName};

/// Largest answer kept: a subject with more referrers than this holds is
/// not served offline (a lost answer only costs offline cover).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct NativeAnswerStore {
    tree: sled::Tree,
    shared: Shared,
}

/// A kept answer: the image index bytes and when the upstream gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeAnswer {
    pub body: Bytes,
    /// Unix seconds.
    pub stored: u64,
}

impl NativeAnswerStore {
    pub(super) fn open(db: &sled::Db, shared: Shared) -> Result<Self, IndexError> {
        Ok(NativeAnswerStore {
            tree: db.open_tree("native_answers")?,
            shared,
        })
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Keeps `body` as the answer for (`repo`, `subject`, `filter`), stamped
    /// now (best effort; too large an answer is not kept, and drops an
    /// older one that no longer tells the truth).
    pub fn set(&self, repo: &RepoName, subject: &Digest, filter: &str, body: &[u8]) {
        let k = key(&[repo.as_str(), subject.as_str(), filter]);
        let written = if body.len() > MAX_ANSWER_BYTES {
            self.tree.remove(k).map(drop)
        } else {
            let mut v = Vec::with_capacity(8 + body.len());
            v.extend_from_slice(&stamp(self.shared.now_secs()));
            v.extend_from_slice(body);
            self.tree.insert(k, v).map(drop)
        };
        self.shared
            .best_effort("native_answers", &format_args!("{repo}@{subject}"), written);
    }

    pub fn get(
        &self,
        repo: &RepoName,
        subject: &Digest,
        filter: &str,
    ) -> Result<Option<NativeAnswer>, IndexError> {
        let k = key(&[repo.as_str(), subject.as_str(), filter]);
        Ok(self.tree.get(k)?.and_then(|v| {
            Some(NativeAnswer {
                stored: stamp_of(&v)?,
                body: Bytes::copy_from_slice(&v[8..]),
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::index::Index;
    use crate::oci::{Digest, RepoName};

    #[test]
    fn answers_are_kept_per_subject_and_filter_and_large_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ix = Index::open(dir.path()).expect("open");
        let a = RepoName::parse("a").expect("n");
        let s = Digest::sha256_of(b"s");
        ix.native_answers().set(&a, &s, "", b"{\"all\":1}");
        ix.native_answers().set(&a, &s, "t", b"{\"t\":1}");
        let got = ix
            .native_answers()
            .get(&a, &s, "")
            .expect("get")
            .expect("kept");
        assert_eq!(&got.body[..], b"{\"all\":1}");
        let big = vec![b' '; super::MAX_ANSWER_BYTES + 1];
        ix.native_answers().set(&a, &s, "t", &big);
        assert_eq!(ix.native_answers().get(&a, &s, "t").expect("get"), None);
    }
}
