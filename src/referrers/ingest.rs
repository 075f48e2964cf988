//! Learning referrers from a fallback-tag index: each entry graft has not
//! seen is checked once by fetching its manifest and reading `subject`
//! (some registries resolve the tag to the subject itself, and old clients
//! make mistakes).
//!
//! Index work is batched on the blocking pool: one pass decides which
//! entries need a check, the checks go to the upstream, one pass records
//! what they found.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use super::{
    fallback, subject_of_tag, Access, Referrers, ReindexStats, ACCEPT_MANIFESTS, READ_LIMIT,
};
use crate::error::Error;
use crate::oci::{Descriptor, Digest, ManifestFields, RepoName};

/// Whose referrers a fallback tag holds.
#[derive(Clone, Copy)]
pub(super) enum Holder<'a> {
    /// The subject is known (the tag names it whole, or graft read the tag
    /// for it).
    Subject(&'a Digest),
    /// Only the tag is known: a truncated long digest. An entry belongs
    /// when its own `subject` has this fallback tag.
    Tag(&'a str),
}

impl Holder<'_> {
    fn subject(&self) -> Option<&Digest> {
        match self {
            Holder::Subject(s) => Some(s),
            Holder::Tag(_) => None,
        }
    }

    fn holds(&self, found: &Digest) -> bool {
        match self {
            Holder::Subject(s) => *s == found,
            Holder::Tag(t) => found.fallback_tag() == *t,
        }
    }
}

/// What ingesting a fallback-tag index found.
pub(super) struct Ingested {
    pub(super) stats: ReindexStats,
    /// The entries the upstream could not judge now, as the tag had them.
    pub(super) undecided: Vec<Descriptor>,
    /// The entries the upstream was asked about just now (their manifests
    /// fetched): reconciling need not ask again.
    pub(super) checked: Vec<Digest>,
}

/// What checking one referrer candidate found.
enum Verdict {
    /// It is a referrer of this subject; here is its descriptor.
    Referrer(Digest, Descriptor),
    /// It exists but is not a referrer of the subject in question.
    NotReferrer,
    /// The upstream could not tell now (unreachable, 5xx, 401): decide later.
    Unknown,
}

/// What the checks decided, to record in one pass.
#[derive(Default)]
struct Findings {
    referrers: Vec<(Digest, Descriptor)>,
    rejected: Vec<Digest>,
}

impl Referrers {
    /// Ingests the entries of a fallback-tag index. When the tag name does
    /// not give the full digest (truncated long digests), each entry's own
    /// `subject` is used, if its fallback tag is the tag read.
    ///
    /// Returns what it added and what it could not decide.
    pub(super) async fn ingest(
        &self,
        repo: &RepoName,
        holder: Holder<'_>,
        index: &[Descriptor],
        auth: Option<&HeaderValue>,
    ) -> Result<Ingested, Error> {
        let subject = holder.subject();
        // Before the tombstone filter: a delete through graft while the
        // entries are being checked stamps a later tombstone, which wins.
        let checked_at = self.index.clock().now_secs();
        let unseen = self.unseen(repo, subject, index).await?;
        let mut findings = Findings::default();
        let mut undecided = Vec::new();
        let checked = unseen.iter().map(|e| e.digest.clone()).collect();
        for entry in unseen {
            match self.check(repo, &entry.digest, auth).await {
                Verdict::Referrer(found, d) if holder.holds(&found) => {
                    findings.referrers.push((found, d))
                }
                Verdict::Referrer(..) | Verdict::NotReferrer => {
                    tracing::info!(%repo, subject = ?subject, entry = %entry.digest, "fallback tag lists a manifest that does not refer to its subject; ignored");
                    findings.rejected.push(entry.digest);
                }
                Verdict::Unknown => undecided.push(entry),
            }
        }
        let added = self
            .record_findings(repo, subject, findings, checked_at)
            .await?;
        let stats = ReindexStats {
            entries: index.len(),
            added,
            undecided: undecided.len(),
        };
        Ok(Ingested {
            stats,
            undecided,
            checked,
        })
    }

    /// The entries that need a check: not deleted through graft, and (when
    /// the subject is known) neither indexed nor rejected for it.
    async fn unseen(
        &self,
        repo: &RepoName,
        subject: Option<&Digest>,
        index: &[Descriptor],
    ) -> Result<Vec<Descriptor>, Error> {
        let (repo, subject, entries) = (repo.clone(), subject.cloned(), index.to_vec());
        let unseen = self
            .index
            .blocking(move |ix| {
                let r = ix.referrers();
                let mut out = Vec::new();
                for e in entries {
                    if r.is_tombstoned(&repo, &e.digest)? {
                        continue;
                    }
                    if let Some(s) = &subject {
                        if r.contains(&repo, s, &e.digest)? || r.is_rejected(&repo, s, &e.digest)? {
                            continue;
                        }
                    }
                    out.push(e);
                }
                Ok(out)
            })
            .await?;
        Ok(unseen)
    }

    /// Indexes the referrers found and remembers the rejections; returns
    /// how many referrers were new. Those deleted through graft since
    /// `checked_at` (when the checks began) stay deleted.
    async fn record_findings(
        &self,
        repo: &RepoName,
        subject: Option<&Digest>,
        findings: Findings,
        checked_at: u64,
    ) -> Result<usize, Error> {
        if findings.referrers.is_empty() && (findings.rejected.is_empty() || subject.is_none()) {
            return Ok(0);
        }
        let (repo, subject) = (repo.clone(), subject.cloned());
        let added = self
            .index
            .blocking(move |ix| {
                let r = ix.referrers();
                let mut added = 0;
                for (found, d) in &findings.referrers {
                    if r.add_unless_deleted_since(&repo, found, d, checked_at)? {
                        added += 1;
                    }
                }
                if let Some(s) = &subject {
                    for d in &findings.rejected {
                        r.reject(&repo, s, d);
                    }
                }
                Ok(added)
            })
            .await?;
        Ok(added)
    }

    /// Reads the fallback tag `tag` of `repo` and ingests its entries
    /// through the same checks a referrers query applies (`graft reindex`).
    /// `auth` must be allowed to read `repo`; a 401/403 comes back as
    /// [`Access::Denied`]. A tag that does not exist (any more) ingests
    /// nothing.
    pub async fn reindex_tag(
        &self,
        repo: &RepoName,
        tag: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<Access<ReindexStats>, Error> {
        let read = match fallback::fetch(self, repo, tag, auth).await? {
            Access::Denied(d) => return Ok(Access::Denied(d)),
            Access::Granted(None) => return Ok(Access::Granted(ReindexStats::default())),
            Access::Granted(Some(read)) => read,
        };
        let subject = subject_of_tag(tag);
        let holder = subject.as_ref().map_or(Holder::Tag(tag), Holder::Subject);
        let stats = self.ingest(repo, holder, &read.index, auth).await?.stats;
        if let Some(s) = &subject {
            if stats.complete() {
                // Queries may skip re-reading this tag while it is unchanged.
                let (ix, r, s, d) = (self.index.clone(), repo.clone(), s.clone(), read.digest);
                ix.blocking(move |ix| {
                    ix.referrers().set_fallback_seen(&r, &s, &d);
                    Ok(())
                })
                .await?;
            }
        }
        self.index.flush().await?;
        Ok(Access::Granted(stats))
    }

    /// Fetches a manifest and tells whether it is a referrer, and of what.
    async fn check(&self, repo: &RepoName, digest: &Digest, auth: Option<&HeaderValue>) -> Verdict {
        let path = format!("/v2/{repo}/manifests/{digest}");
        let accept = [(header::ACCEPT, ACCEPT_MANIFESTS)];
        let resp = match self
            .upstream
            .call(Method::GET, &path, auth, &accept, Bytes::new())
            .await
        {
            Ok(r) => r,
            Err(_) => return Verdict::Unknown,
        };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Verdict::NotReferrer;
        }
        if !status.is_success() {
            return Verdict::Unknown;
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let Ok(bytes) = self
            .upstream
            .read_limited(resp.into_body(), READ_LIMIT)
            .await
        else {
            return Verdict::Unknown;
        };
        if digest.verify(&bytes) == Some(false) {
            return Verdict::NotReferrer;
        }
        let Some(fields) = ManifestFields::parse(&bytes) else {
            return Verdict::NotReferrer;
        };
        match &fields.subject {
            Some(s) => {
                let d = fields.referrer_descriptor(
                    digest.clone(),
                    bytes.len() as u64,
                    content_type.as_deref(),
                );
                Verdict::Referrer(s.digest.clone(), d)
            }
            None => Verdict::NotReferrer,
        }
    }
}
