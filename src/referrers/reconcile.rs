//! Reconciling the index with a fallback tag that changed, with the
//! upstream as the judge: a tag another writer rewrote (an old client, a
//! replica, a registry's garbage collector) may lack referrers graft knows,
//! or still list ones deleted straight at the registry. Graft does not
//! trust either side: it asks the upstream about each such manifest (a
//! HEAD). Gone (404) leaves the index with a tombstone, so a stale tag
//! elsewhere cannot bring it back; present is kept, and the tag repaired.
//!
//! The HEADs one read may cost are bounded ([`MAX_HEADS_PER_READ`]): the
//! entries the tag lacks come first, and when they do not all fit the tag
//! stays "unseen", so the next query reads it again and carries on.

use http::header::HeaderValue;
use http::StatusCode;

use super::fallback::TagRead;
use super::Referrers;
use crate::error::Error;
use crate::oci::{Descriptor, Digest, RepoName};

/// Most manifests one read of a fallback tag asks the upstream about.
pub(super) const MAX_HEADS_PER_READ: usize = 32;

/// What the upstream said about one manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence {
    Present,
    /// 404: deleted (straight at the registry, or by its garbage collector).
    Gone,
    /// No answer that decides (unreachable, 5xx, 401/403, 429).
    Unknown,
}

/// What reconciling one tag read did.
#[derive(Debug, Default)]
pub(super) struct Reconciled {
    /// Every known entry the tag lacks was judged.
    pub(super) complete: bool,
    /// The tag should be rewritten: it lists a manifest that is gone, or
    /// lacks a referrer that still exists.
    pub(super) rewrite: bool,
}

impl Referrers {
    /// HEADs `digest` in `repo` with `auth` (the read's credentials, or
    /// graft's own for its own upkeep).
    pub(super) async fn presence(
        &self,
        repo: &RepoName,
        digest: &Digest,
        auth: Option<&HeaderValue>,
    ) -> Presence {
        match self.head_manifest(repo, digest, auth).await {
            Ok(s) if s.is_success() => Presence::Present,
            Ok(StatusCode::NOT_FOUND) => Presence::Gone,
            _ => Presence::Unknown,
        }
    }

    /// Whether `tag` differs from the copy of the tag of `subject` graft
    /// last read or wrote.
    pub(super) async fn tag_changed(
        &self,
        repo: &RepoName,
        subject: &Digest,
        tag: &TagRead,
    ) -> Result<bool, Error> {
        let (r, s) = (repo.clone(), subject.clone());
        let seen = self
            .index
            .blocking(move |ix| ix.referrers().fallback_seen(&r, &s))
            .await?;
        Ok(seen.as_deref() != Some(tag.digest.as_str()))
    }

    /// Judges the referrers of `subject` graft knows against `tag` (read
    /// just now, and already ingested; `fresh` are the entries ingesting
    /// just asked the upstream about): the known ones it lacks first, then
    /// (with what is left of the budget) some it lists, starting at a place
    /// the tag's digest picks so that successive reads cover all of them.
    pub(super) async fn reconcile(
        &self,
        repo: &RepoName,
        subject: &Digest,
        tag: &TagRead,
        fresh: &[Digest],
        auth: Option<&HeaderValue>,
    ) -> Result<Reconciled, Error> {
        let (r, s) = (repo.clone(), subject.clone());
        let known = self
            .index
            .blocking(move |ix| ix.referrers().list(&r, &s))
            .await?;
        let (lacked, mut listed): (Vec<Descriptor>, Vec<Descriptor>) = known
            .into_iter()
            .partition(|k| !tag.index.iter().any(|e| e.digest == k.digest));
        listed.retain(|k| !fresh.contains(&k.digest));
        let mut out = Reconciled {
            complete: lacked.len() <= MAX_HEADS_PER_READ,
            rewrite: false,
        };
        let mut gone = Vec::new();
        for k in lacked.iter().take(MAX_HEADS_PER_READ) {
            match self.presence(repo, &k.digest, auth).await {
                Presence::Gone => gone.push(k.digest.clone()),
                Presence::Present => out.rewrite = true,
                Presence::Unknown => out.complete = false,
            }
        }
        let budget = MAX_HEADS_PER_READ.saturating_sub(lacked.len());
        let start = rotation(&tag.digest, listed.len());
        for k in listed
            .iter()
            .cycle()
            .skip(start)
            .take(budget.min(listed.len()))
        {
            if self.presence(repo, &k.digest, auth).await == Presence::Gone {
                gone.push(k.digest.clone());
                out.rewrite = true;
            }
        }
        if !gone.is_empty() {
            tracing::info!(%repo, %subject, gone = gone.len(), "referrers deleted upstream; dropped from the index");
            // This subject's tag is the caller's to repair (`rewrite`).
            self.forget_gone(repo, gone, Some(subject)).await?;
        }
        Ok(out)
    }

    /// Drops referrers the upstream said are gone: out of the index, with a
    /// tombstone, and (when graft keeps tags) the tags of their subjects
    /// other than `except` owe a rewrite.
    pub(super) async fn forget_gone(
        &self,
        repo: &RepoName,
        gone: Vec<Digest>,
        except: Option<&Digest>,
    ) -> Result<(), Error> {
        let owe = self.writes_tags();
        let (r, except) = (repo.clone(), except.cloned());
        self.index
            .blocking(move |ix| {
                for d in &gone {
                    for s in ix.referrers().remove_referrer(&r, d)? {
                        if owe && except.as_ref() != Some(&s) {
                            ix.intents().owe_tag_write(&r, &s)?;
                        }
                    }
                }
                Ok(())
            })
            .await?;
        self.index.flush().await?;
        Ok(())
    }
}

/// Where the HEADs of listed entries start: picked by the tag's digest, so
/// each new version of a tag checks a different window of a long list.
fn rotation(tag_digest: &str, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let spread = tag_digest.bytes().fold(0usize, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(b as usize)
    });
    spread % len
}

#[cfg(test)]
mod tests {
    use super::rotation;

    #[test]
    fn the_rotation_stays_within_the_list() {
        assert_eq!(rotation("sha256:abc", 0), 0);
        for len in 1..50 {
            assert!(rotation("sha256:abcdef", len) < len);
        }
    }
}
