//! `graft reindex`: rebuilds the referrers index from the upstream's
//! fallback tags, for a data directory that is new, lost, or behind
//! clients that wrote tags while graft was not in front of the registry.
//!
//! It walks the repositories (`--repo`, or all of them through
//! `/v2/_catalog`), lists each one's tags (`/v2/<name>/tags/list`,
//! following `Link` pagination), and hands every tag shaped like a
//! fallback tag to [`Referrers::reindex_tag`], so its entries pass the same
//! checks a referrers query applies: each unseen entry's manifest is fetched
//! and must name the subject. It acts with graft's own upstream credentials
//! (`upstream.username`/`upstream.password`).
//!
//! It opens the sled index itself, and sled admits one process per index:
//! while `graft serve` runs on the same data directory the command fails
//! with [`IndexError::Locked`] instead of waiting.

use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use super::{Outcome, Pages, Progress, Unit};
use crate::config::Config;
use crate::credentials::CredentialKeys;
use crate::index::{Index, IndexError};
use crate::oci::RepoName;
use crate::referrers::{is_fallback_tag, Access, Referrers};
use crate::upstream::Upstream;

/// Largest catalog or tags-list page read (distribution sends every tag of
/// a repository in one page).
const PAGE_LIMIT: usize = 64 * 1024 * 1024;

/// Pages followed before a `Link` chain is taken for a loop.
const MAX_PAGES: usize = 100_000;

/// What a reindex did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReindexSummary {
    /// Repositories whose tags were listed.
    pub repositories: usize,
    /// Fallback tags read: each stands for one subject.
    pub subjects: usize,
    /// Referrers the index did not know before.
    pub referrers_added: usize,
    /// Entries of those tags, known or not.
    pub entries: usize,
    /// Entries the upstream could not judge now (unreachable, 5xx, 401);
    /// a later reindex or query checks them again.
    pub undecided: usize,
    /// Repositories or tags that could not be read, one line each.
    pub problems: Vec<String>,
}

impl ReindexSummary {
    /// Whether everything found was read and decided.
    pub fn is_complete(&self) -> bool {
        self.undecided == 0 && self.problems.is_empty()
    }
}

impl fmt::Display for ReindexSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "repositories: {}", self.repositories)?;
        writeln!(f, "subjects: {}", self.subjects)?;
        write!(f, "referrers added: {}", self.referrers_added)?;
        if self.undecided > 0 {
            write!(
                f,
                "\nentries the upstream could not judge now (run again later): {}",
                self.undecided
            )?;
        }
        for p in &self.problems {
            write!(f, "\nnot reindexed: {p}")?;
        }
        Ok(())
    }
}

/// A reason the reindex could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ReindexError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{0}")]
    Upstream(String),
    #[error(
        "the upstream refused to list its repositories ({0}); name them with --repo, \
         or give graft credentials that may read the catalog (upstream.username/password)"
    )]
    CatalogRefused(StatusCode),
}

impl From<crate::Error> for ReindexError {
    fn from(e: crate::Error) -> Self {
        ReindexError::Upstream(e.to_string())
    }
}

/// Walks `repos` (every repository in the upstream's catalog when empty)
/// and ingests their fallback tags into the index under
/// `config.storage.data_dir`. `progress` hears how far it got; pass
/// [`super::Silent`] for none.
///
/// The index is closed again when this returns, so `graft serve` can
/// start on it right after.
pub async fn run(
    config: &Config,
    repos: &[RepoName],
    progress: &dyn Progress,
) -> Result<ReindexSummary, ReindexError> {
    let ran = reindex(config, repos, progress).await;
    // On every path, errors included: a display must stop before the error
    // is shown.
    progress.finish(Outcome::Clear);
    ran
}

async fn reindex(
    config: &Config,
    repos: &[RepoName],
    progress: &dyn Progress,
) -> Result<ReindexSummary, ReindexError> {
    let index = Index::open(&config.storage.data_dir.join("index"))?;
    let auth = config.upstream.own_authorization();
    // No client is involved: without an account, tokens are fetched
    // anonymously.
    let upstream = Upstream::new(&config.upstream)?.client_credentials(auth.as_ref());
    let referrers = Referrers::new(
        index,
        upstream.clone(),
        config.referrers.clone(),
        auth.clone(),
        CredentialKeys::load_or_create(&config.storage.data_dir)
            .map_err(|e| ReindexError::Upstream(format!("credentials secret: {e}")))?,
    );
    let walked = walk(&referrers, &upstream, auth.as_ref(), repos, progress).await;
    referrers.index().flush().await?;
    walked
}

/// Lists the repositories' tags, then reindexes every fallback tag among
/// them; what cannot be read is noted in the summary, not fatal.
async fn walk(
    referrers: &Referrers,
    upstream: &Upstream,
    auth: Option<&HeaderValue>,
    repos: &[RepoName],
    progress: &dyn Progress,
) -> Result<ReindexSummary, ReindexError> {
    let mut summary = ReindexSummary::default();
    let repos = if repos.is_empty() {
        progress.message("listing repositories");
        catalog(upstream, auth).await?
    } else {
        repos.to_vec()
    };

    let mut work = Vec::new();
    for (i, repo) in repos.iter().enumerate() {
        progress.message(&format!("listing tags {}/{}: {repo}", i + 1, repos.len()));
        match tags(upstream, repo, auth).await {
            Ok(Some(tags)) => {
                summary.repositories += 1;
                work.extend(
                    tags.into_iter()
                        .filter(|t| is_fallback_tag(t))
                        .map(|t| (repo.clone(), t)),
                );
            }
            Ok(None) => summary
                .problems
                .push(format!("{repo}: no such repository upstream")),
            Err(e) => summary.problems.push(format!("{repo}: {e}")),
        }
    }

    progress.count(work.len() as u64, Unit::Items("fallback tags"));
    for (repo, tag) in &work {
        progress.message(&format!("{repo}:{tag}"));
        match referrers.reindex_tag(repo, tag, auth).await {
            Ok(Access::Granted(stats)) => {
                summary.subjects += 1;
                summary.entries += stats.entries;
                summary.referrers_added += stats.added;
                summary.undecided += stats.undecided;
            }
            Ok(Access::Denied(d)) => summary.problems.push(format!(
                "{repo}:{tag}: the upstream answered {} (graft's own credentials may not read it)",
                d.status
            )),
            Err(e) => summary.problems.push(format!("{repo}:{tag}: {e}")),
        }
        progress.advance(1);
    }
    Ok(summary)
}

/// Every repository in the upstream's catalog.
pub(super) async fn catalog(
    upstream: &Upstream,
    auth: Option<&HeaderValue>,
) -> Result<Vec<RepoName>, ReindexError> {
    let names = match pages(upstream, "/v2/_catalog", "repositories", auth).await? {
        Listing::Listed(names) => names,
        Listing::Refused(status) | Listing::Missing(status) => {
            return Err(ReindexError::CatalogRefused(status))
        }
    };
    let mut repos = Vec::with_capacity(names.len());
    for name in names {
        match RepoName::parse(&name) {
            Ok(r) => repos.push(r),
            Err(e) => {
                tracing::warn!(error = %e, "catalog lists an invalid repository name; skipped")
            }
        }
    }
    Ok(repos)
}

/// The tags of `repo`; `None` when the upstream does not know it.
pub(super) async fn tags(
    upstream: &Upstream,
    repo: &RepoName,
    auth: Option<&HeaderValue>,
) -> Result<Option<Vec<String>>, ReindexError> {
    match pages(upstream, &format!("/v2/{repo}/tags/list"), "tags", auth).await? {
        Listing::Listed(tags) => Ok(Some(tags)),
        Listing::Missing(_) => Ok(None),
        Listing::Refused(status) => Err(ReindexError::Upstream(format!(
            "the upstream answered {status} listing tags (graft's own credentials may not read it)"
        ))),
    }
}

enum Listing {
    Listed(Vec<String>),
    Refused(StatusCode),
    Missing(StatusCode),
}

/// Collects the string array `field` from every page of a paginated list,
/// following `Link: <…>; rel="next"`.
async fn pages(
    upstream: &Upstream,
    first: &str,
    field: &str,
    auth: Option<&HeaderValue>,
) -> Result<Listing, ReindexError> {
    let accept = [(header::ACCEPT, "application/json")];
    let mut out = Vec::new();
    let mut pages = Pages::new(first.to_string(), MAX_PAGES);
    while let Some(path) = pages
        .next_path()
        .map_err(|e| ReindexError::Upstream(e.to_string()))?
    {
        let resp = upstream
            .call(Method::GET, &path, auth, &accept, Bytes::new())
            .await
            .map_err(|e| ReindexError::Upstream(format!("{path}: {e}")))?;
        let status = resp.status();
        if crate::upstream::is_denial(status) {
            return Ok(Listing::Refused(status));
        }
        if status == StatusCode::NOT_FOUND {
            return Ok(Listing::Missing(status));
        }
        if !status.is_success() {
            return Err(ReindexError::Upstream(format!(
                "{path}: the upstream answered {status}"
            )));
        }
        pages.followed(resp.headers(), upstream.origin());
        let bytes = upstream
            .read_limited(resp.into_body(), PAGE_LIMIT)
            .await
            .map_err(|e| ReindexError::Upstream(format!("{path}: {e}")))?;
        let page: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ReindexError::Upstream(format!("{path}: not a JSON list ({e})")))?;
        // `null` is how distribution writes "no tags".
        if let Some(items) = page.get(field).and_then(|v| v.as_array()) {
            out.extend(items.iter().filter_map(|v| v.as_str()).map(str::to_string));
        }
    }
    Ok(Listing::Listed(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lists_counts_then_what_is_left() {
        let mut s = ReindexSummary {
            repositories: 2,
            subjects: 3,
            referrers_added: 5,
            entries: 6,
            ..ReindexSummary::default()
        };
        assert!(s.is_complete());
        assert_eq!(
            s.to_string(),
            "repositories: 2\nsubjects: 3\nreferrers added: 5"
        );
        s.problems.push("a: no such repository upstream".into());
        assert!(!s.is_complete());
        assert!(s
            .to_string()
            .ends_with("\nnot reindexed: a: no such repository upstream"));
    }
}
