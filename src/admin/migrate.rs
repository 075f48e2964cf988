//! `graft migrate`: after the registry was upgraded to one that serves the
//! referrers API itself, makes its own index complete, so that graft's
//! union becomes a pure pass-through and the fallback tags may go.
//!
//! A registry that gained the API by upgrade may index only manifests
//! pushed after the upgrade (distribution's proposed implementation records
//! a referrer link when a manifest is pushed). So for every entry of every
//! fallback tag (the walk of `graft reindex`: `--repo`, or the catalog),
//! the command GETs the manifest and PUTs it back unchanged — same bytes,
//! same media type, by digest — and then checks that the native API lists
//! it. With `--dry-run` it only reads (GET and HEAD). With
//! `--remove-fallback-tags` a tag whose entries are all listed natively is
//! deleted, by its digest, when no other tag points at that digest.
//!
//! Every request goes through [`Upstream::call`] with graft's own
//! credentials (`upstream.username`/`upstream.password`), so token
//! registries work. It needs no data directory: it can run while graft
//! serves.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};

use super::reindex::{catalog, tags, ReindexError};
use super::{Outcome, Pages, Progress, Unit};
use crate::config::Config;
use crate::oci::media::{ACCEPT_MANIFESTS, IMAGE_INDEX};
use crate::oci::{Digest, ImageIndex, RepoName};
use crate::referrers::{is_fallback_tag, subject_of_tag};
use crate::upstream::Upstream;

/// Largest manifest or index read.
const READ_LIMIT: usize = 8 * 1024 * 1024;
/// Pages of one native referrers list followed before it is taken for a loop.
const MAX_PAGES: usize = 100;

/// What `graft migrate` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct MigrateOptions {
    /// Repositories to walk; every one in the catalog when empty.
    pub repos: Vec<RepoName>,
    /// Only read: report what would be migrated.
    pub dry_run: bool,
    /// Delete a fallback tag once all its entries are listed natively.
    pub remove_fallback_tags: bool,
}

/// What happened in one repository.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepoReport {
    /// Entries re-pushed and now listed by the native API.
    pub migrated: usize,
    /// Entries the native API listed already.
    pub already_native: usize,
    /// Entries a dry run would re-push.
    pub would_migrate: usize,
    /// Entries whose manifest the registry no longer holds (nothing to do).
    pub gone: usize,
    /// Fallback tags deleted (`--remove-fallback-tags`).
    pub tags_removed: usize,
    /// What could not be done, one line each.
    pub failed: Vec<String>,
}

/// What a migration did, per repository.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateSummary {
    pub dry_run: bool,
    pub repos: BTreeMap<String, RepoReport>,
    /// Repositories that could not be walked at all.
    pub problems: Vec<String>,
}

impl MigrateSummary {
    /// Whether nothing is left: no failure, and (for a dry run) nothing
    /// that would still need migrating.
    pub fn is_complete(&self) -> bool {
        self.problems.is_empty()
            && self
                .repos
                .values()
                .all(|r| r.failed.is_empty() && r.would_migrate == 0)
    }

    fn total(&self) -> RepoReport {
        let mut t = RepoReport::default();
        for r in self.repos.values() {
            t.migrated += r.migrated;
            t.already_native += r.already_native;
            t.would_migrate += r.would_migrate;
            t.gone += r.gone;
            t.tags_removed += r.tags_removed;
            t.failed.extend(r.failed.iter().cloned());
        }
        t
    }
}

impl fmt::Display for RepoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "migrated {}, already native {}",
            self.migrated, self.already_native
        )?;
        if self.would_migrate > 0 {
            write!(f, ", would migrate {}", self.would_migrate)?;
        }
        if self.gone > 0 {
            write!(f, ", gone {}", self.gone)?;
        }
        if self.tags_removed > 0 {
            write!(f, ", fallback tags removed {}", self.tags_removed)?;
        }
        write!(f, ", failed {}", self.failed.len())
    }
}

impl fmt::Display for MigrateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            writeln!(f, "dry run: nothing was changed")?;
        }
        for (repo, r) in &self.repos {
            writeln!(f, "{repo}: {r}")?;
        }
        write!(f, "total: {}", self.total())?;
        for (repo, r) in &self.repos {
            for line in &r.failed {
                write!(f, "\nfailed: {repo}: {line}")?;
            }
        }
        for p in &self.problems {
            write!(f, "\nnot migrated: {p}")?;
        }
        Ok(())
    }
}

/// Walks the repositories and migrates their fallback-tag entries to the
/// upstream's native referrers API. `progress` hears how far it got.
pub async fn run(
    config: &Config,
    opts: &MigrateOptions,
    progress: &dyn Progress,
) -> Result<MigrateSummary, ReindexError> {
    let ran = migrate(config, opts, progress).await;
    progress.finish(Outcome::Clear);
    ran
}

async fn migrate(
    config: &Config,
    opts: &MigrateOptions,
    progress: &dyn Progress,
) -> Result<MigrateSummary, ReindexError> {
    let auth = config.upstream.own_authorization();
    let upstream = Upstream::new(&config.upstream)?.client_credentials(auth.as_ref());
    let m = Migration {
        upstream: &upstream,
        auth: auth.as_ref(),
        opts,
    };
    let mut summary = MigrateSummary {
        dry_run: opts.dry_run,
        ..MigrateSummary::default()
    };
    let repos = if opts.repos.is_empty() {
        progress.message("listing repositories");
        catalog(&upstream, auth.as_ref()).await?
    } else {
        opts.repos.clone()
    };
    let mut work = Vec::new();
    for (i, repo) in repos.iter().enumerate() {
        progress.message(&format!("listing tags {}/{}: {repo}", i + 1, repos.len()));
        match tags(&upstream, repo, auth.as_ref()).await {
            Ok(Some(all)) => {
                summary
                    .repos
                    .insert(repo.to_string(), RepoReport::default());
                work.push((repo.clone(), all));
            }
            Ok(None) => summary
                .problems
                .push(format!("{repo}: no such repository upstream")),
            Err(e) => summary.problems.push(format!("{repo}: {e}")),
        }
    }
    let fallback_count = work
        .iter()
        .map(|(_, t)| t.iter().filter(|t| is_fallback_tag(t)).count())
        .sum::<usize>();
    progress.count(fallback_count as u64, Unit::Items("fallback tags"));
    for (repo, all_tags) in &work {
        let report = summary
            .repos
            .get_mut(&repo.to_string())
            .expect("every walked repository has a report");
        let mut tag_digests = None;
        for tag in all_tags.iter().filter(|t| is_fallback_tag(t)) {
            progress.message(&format!("{repo}:{tag}"));
            if let Err(e) = m.tag(repo, tag, all_tags, &mut tag_digests, report).await {
                report.failed.push(format!("{tag}: {e}"));
            }
            progress.advance(1);
        }
    }
    Ok(summary)
}

struct Migration<'a> {
    upstream: &'a Upstream,
    auth: Option<&'a HeaderValue>,
    opts: &'a MigrateOptions,
}

/// Why one step of the migration failed.
type StepError = String;

impl Migration<'_> {
    /// Migrates the entries of one fallback tag, and removes it when asked
    /// and everything is native.
    async fn tag(
        &self,
        repo: &RepoName,
        tag: &str,
        all_tags: &[String],
        tag_digests: &mut Option<HashMap<String, String>>,
        report: &mut RepoReport,
    ) -> Result<(), StepError> {
        let Some(subject) = subject_of_tag(tag) else {
            // A truncated tag names no subject whose native list could be
            // checked.
            return Err("the tag does not name its subject whole; left alone".into());
        };
        let (entries, tag_digest) = match self.get(repo, tag, IMAGE_INDEX).await? {
            Some((bytes, _, digest)) => {
                let ix: ImageIndex = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("the tag is not an image index: {e}"))?;
                (ix.manifests, digest)
            }
            None => return Ok(()),
        };
        let native = self.native_list(repo, &subject).await?;
        let mut pushed = Vec::new();
        let mut settled = true;
        for d in &entries {
            if native.contains(&d.digest) {
                report.already_native += 1;
                continue;
            }
            let Some((bytes, media_type, _)) =
                self.get(repo, d.digest.as_str(), ACCEPT_MANIFESTS).await?
            else {
                report.gone += 1;
                continue;
            };
            if self.opts.dry_run {
                report.would_migrate += 1;
                settled = false;
                continue;
            }
            match self.put(repo, &d.digest, &media_type, bytes).await {
                Ok(()) => pushed.push(d.digest.clone()),
                Err(e) => {
                    report.failed.push(format!("{}: {e}", d.digest));
                    settled = false;
                }
            }
        }
        if !pushed.is_empty() {
            let native = self.native_list(repo, &subject).await?;
            for digest in pushed {
                if native.contains(&digest) {
                    report.migrated += 1;
                } else {
                    settled = false;
                    report.failed.push(format!(
                        "{digest}: pushed again, but the registry's referrers API does not list it"
                    ));
                }
            }
        }
        if settled && self.opts.remove_fallback_tags && !self.opts.dry_run {
            if let Some(digest) = tag_digest {
                self.remove_tag(repo, tag, &digest, all_tags, tag_digests)
                    .await?;
                report.tags_removed += 1;
            }
        }
        Ok(())
    }

    /// Deletes the fallback tag `tag` (digest `digest`): distribution
    /// deletes by digest, which removes every tag on it, so only when no
    /// other tag of the repository points at the same digest.
    async fn remove_tag(
        &self,
        repo: &RepoName,
        tag: &str,
        digest: &str,
        all_tags: &[String],
        tag_digests: &mut Option<HashMap<String, String>>,
    ) -> Result<(), StepError> {
        if tag_digests.is_none() {
            let mut map = HashMap::new();
            for t in all_tags {
                if let Some(d) = self.head_digest(repo, t).await? {
                    map.insert(t.clone(), d);
                }
            }
            *tag_digests = Some(map);
        }
        let shared = tag_digests
            .as_ref()
            .expect("filled above")
            .iter()
            .any(|(t, d)| t != tag && d == digest);
        if shared {
            return Err(format!(
                "another tag points at the fallback index {digest}; not deleted"
            ));
        }
        let path = format!("/v2/{repo}/manifests/{digest}");
        let resp = self
            .upstream
            .call(Method::DELETE, &path, self.auth, &[], Bytes::new())
            .await
            .map_err(|e| format!("DELETE {path}: {e}"))?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(format!("DELETE {path}: the upstream answered {s}")),
        }
    }

    /// GETs a manifest: its bytes, media type and digest; `None` on 404.
    async fn get(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<Option<(Bytes, String, Option<String>)>, StepError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let accept = [(header::ACCEPT, accept)];
        let resp = self
            .upstream
            .call(Method::GET, &path, self.auth, &accept, Bytes::new())
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(format!("GET {path}: the upstream answered {s}")),
        }
        let header_str = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let media_type = header_str("content-type").unwrap_or_default();
        let digest = header_str("docker-content-digest");
        let bytes = self
            .upstream
            .read_limited(resp.into_body(), READ_LIMIT)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let digest = digest.or_else(|| Some(Digest::sha256_of(&bytes).to_string()));
        Ok(Some((bytes, media_type, digest)))
    }

    /// The digest a tag points at (HEAD); `None` when the tag is gone.
    async fn head_digest(&self, repo: &RepoName, tag: &str) -> Result<Option<String>, StepError> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let accept = [(header::ACCEPT, ACCEPT_MANIFESTS)];
        let resp = self
            .upstream
            .call(Method::HEAD, &path, self.auth, &accept, Bytes::new())
            .await
            .map_err(|e| format!("HEAD {path}: {e}"))?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)),
            s => Err(format!("HEAD {path}: the upstream answered {s}")),
        }
    }

    /// PUTs `bytes` back by digest, unchanged, so the registry indexes it.
    async fn put(
        &self,
        repo: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), StepError> {
        let path = format!("/v2/{repo}/manifests/{digest}");
        let headers = [(header::CONTENT_TYPE, media_type)];
        let resp = self
            .upstream
            .call(Method::PUT, &path, self.auth, &headers, bytes)
            .await
            .map_err(|e| format!("PUT {path}: {e}"))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "PUT {path}: the upstream answered {}",
                resp.status()
            ))
        }
    }

    /// The digests the upstream's own referrers API lists for `subject`.
    async fn native_list(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<HashSet<Digest>, StepError> {
        let accept = [(header::ACCEPT, IMAGE_INDEX)];
        let mut listed = HashSet::new();
        let mut pages = Pages::new(format!("/v2/{repo}/referrers/{subject}"), MAX_PAGES);
        while let Some(path) = pages.next_path().map_err(|e| e.to_string())? {
            let resp = self
                .upstream
                .call(Method::GET, &path, self.auth, &accept, Bytes::new())
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let is_index = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(IMAGE_INDEX.as_bytes()));
            if resp.status() != StatusCode::OK || !is_index {
                return Err(format!(
                    "GET {path}: the upstream answered {} without an image index: \
                     it does not serve the referrers API",
                    resp.status()
                ));
            }
            pages.followed(resp.headers(), self.upstream.origin());
            let bytes = self
                .upstream
                .read_limited(resp.into_body(), READ_LIMIT)
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let ix: ImageIndex = serde_json::from_slice(&bytes)
                .map_err(|e| format!("GET {path}: not an image index: {e}"))?;
            listed.extend(ix.manifests.into_iter().map(|d| d.digest));
        }
        Ok(listed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_per_repository_and_says_what_is_left() {
        let mut s = MigrateSummary::default();
        s.repos.insert(
            "app".into(),
            RepoReport {
                migrated: 2,
                already_native: 1,
                ..RepoReport::default()
            },
        );
        assert!(s.is_complete());
        assert_eq!(
            s.to_string(),
            "app: migrated 2, already native 1, failed 0\n\
             total: migrated 2, already native 1, failed 0"
        );
        s.dry_run = true;
        s.repos.get_mut("app").expect("app").would_migrate = 3;
        assert!(!s.is_complete(), "a dry run with work left is not complete");
        assert!(s.to_string().starts_with("dry run: nothing was changed\n"));
    }
}
