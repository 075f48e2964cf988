//! Tags: which digest a tag names, as the cache knows it.
//!
//! A tag record (digest, media type, when the upstream last confirmed it)
//! is trusted for `cache.tag_ttl`; after that the proxy's revalidation (a
//! HEAD upstream, which does not count against registry pull limits) is
//! asked. While the upstream is unreachable (no answer, 429, 5xx), the last
//! known digest stands for `cache.max_stale`, for clients whose access was
//! confirmed before.

use std::future::Future;
use std::sync::Arc;

use super::{ContentCache, Hit, Store};
use crate::error::Error;
use crate::index::TagRecord;
use crate::metrics;
use crate::oci::{Digest, RepoName};

/// What the upstream said about a tag when asked.
pub(crate) enum Revalidation {
    /// The tag names `digest`.
    Current {
        digest: Digest,
        media_type: Option<String>,
    },
    /// The upstream could not answer: `error` when no response came at all
    /// (no stale answer then means this error), `None` for 429/5xx (the
    /// upstream's own answer then goes to the client).
    Outage { why: String, error: Option<Error> },
    /// Any other answer (401, 404, no digest): the upstream answers the
    /// client itself.
    Other,
}

/// What to serve for a tag.
pub(crate) enum TagAnswer {
    /// Cached content for the tag's digest (confirmed now, or the last
    /// known one while the upstream is out). `fresh`: decided without the
    /// upstream, within `tag_ttl` and `auth_ttl`.
    Hit {
        digest: Digest,
        hit: Hit,
        fresh: bool,
    },
    /// The upstream named a digest the cache does not hold (fetch it).
    Uncached { digest: Digest },
    /// No digest to serve: what the upstream said.
    Unresolved(Revalidation),
}

impl ContentCache {
    /// Resolves `tag` in `repo` to cached content, a digest to fetch, or
    /// the upstream's answer; `revalidate` is awaited only when the record
    /// is missing or older than `cache.tag_ttl`. `fresh_yes`: a yes within
    /// `auth_ttl` stands for this client on `repo`; `stale_yes` says whether
    /// one within `max_stale` does (asked only in an outage).
    pub(crate) async fn resolve_tag<S, SF, F>(
        self: &Arc<Self>,
        repo: &RepoName,
        tag: &str,
        fresh_yes: bool,
        stale_yes: S,
        revalidate: F,
    ) -> TagAnswer
    where
        S: FnOnce() -> SF,
        SF: Future<Output = bool>,
        F: Future<Output = Revalidation>,
    {
        let known = self.tag_record(repo, tag).await;
        if let Some(rec) = &known {
            let fresh =
                !self.cfg.tag_ttl.is_zero() && self.clock.within(rec.checked, self.cfg.tag_ttl);
            // A digest deleted through graft (or found gone) is forgotten
            // as present: the tag is then asked about, not served blind.
            let present = self.index.present().known(repo, &rec.digest);
            if fresh && fresh_yes && present {
                if let Some(hit) = self.tag_hit(rec).await {
                    return TagAnswer::Hit {
                        digest: rec.digest.clone(),
                        hit,
                        fresh: true,
                    };
                }
            }
        }
        let (digest, media_type) = match revalidate.await {
            Revalidation::Current { digest, media_type } => (digest, media_type),
            Revalidation::Outage { why, error } => {
                return match self.stale(repo, tag, known, stale_yes, &why).await {
                    Some(answer) => answer,
                    None => TagAnswer::Unresolved(Revalidation::Outage { why, error }),
                }
            }
            Revalidation::Other => return TagAnswer::Unresolved(Revalidation::Other),
        };
        self.mark_present(repo, &digest).await;
        let rec = TagRecord {
            digest,
            media_type,
            checked: self.clock.now_secs(),
        };
        self.set_tag_record(repo, tag, &rec).await;
        match self.tag_hit(&rec).await {
            Some(hit) => TagAnswer::Hit {
                digest: rec.digest,
                hit,
                fresh: false,
            },
            None => TagAnswer::Uncached { digest: rec.digest },
        }
    }

    /// The last known digest, while it is younger than `max_stale` and the
    /// client was allowed before.
    async fn stale<SF: Future<Output = bool>>(
        self: &Arc<Self>,
        repo: &RepoName,
        tag: &str,
        known: Option<TagRecord>,
        stale_yes: impl FnOnce() -> SF,
        why: &str,
    ) -> Option<TagAnswer> {
        let rec = known?;
        if !self.clock.within(rec.checked, self.cfg.max_stale) || !stale_yes().await {
            return None;
        }
        let hit = self.tag_hit(&rec).await?;
        let age = self.clock.now_secs().saturating_sub(rec.checked);
        tracing::warn!(%repo, %tag, digest = %rec.digest, age_secs = age, reason = %why, "upstream unavailable; serving the last known tag digest");
        metrics::inc(&self.metrics.tag_stale_served);
        Some(TagAnswer::Hit {
            digest: rec.digest,
            hit,
            fresh: false,
        })
    }

    /// The cached manifest a tag record names, with the record's media type.
    async fn tag_hit(self: &Arc<Self>, rec: &TagRecord) -> Option<Hit> {
        if !Store::cacheable(&rec.digest) {
            return None;
        }
        let mut hit = self.hit(&rec.digest, true).await?;
        if let Some(m) = &rec.media_type {
            hit.media_type = Some(m.clone());
        }
        Some(hit)
    }

    async fn tag_record(&self, repo: &RepoName, tag: &str) -> Option<TagRecord> {
        if let Some(rec) = self.index.tags().known(repo, tag) {
            return Some(rec);
        }
        let (index, r, t) = (self.index.clone(), repo.clone(), tag.to_string());
        Self::blocking(move || index.tags().get(&r, &t))
            .await
            .ok()?
            .ok()?
    }

    async fn set_tag_record(&self, repo: &RepoName, tag: &str, rec: &TagRecord) {
        // The same confirmation within the same second: nothing to write.
        if self.index.tags().known(repo, tag).as_ref() == Some(rec) {
            return;
        }
        let (index, r, t, rec) = (
            self.index.clone(),
            repo.clone(),
            tag.to_string(),
            rec.clone(),
        );
        // The index logs and counts a failed write; only a lost task is ours.
        if let Err(e) = Self::blocking(move || index.tags().set(&r, &t, &rec)).await {
            tracing::error!(error = %e, "recording a tag digest failed");
        }
    }
}
