//! Upstreams that serve the referrers API themselves (mode `auto`). A
//! registry that gained the API by upgrade may index only what was pushed
//! after the upgrade, so everything that lived only in fallback tags would
//! vanish from its answer. Graft answers with the union: the upstream's own
//! list (all its pages), plus the referrers graft knows (index and fallback
//! tag) that the upstream lacks but still holds. The upstream's descriptor
//! wins where both list a digest: it is the registry's own account of its
//! content.
//!
//! Every request here carries the client's credentials: the union never
//! shows a client more than the upstream lets it read.

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use std::collections::HashSet;

use super::reconcile::Presence;
use super::{Access, Referrers};
use crate::admin::Pages;
use crate::error::Error;
use crate::oci::{media, query, Descriptor, Digest, ImageIndex, RepoName};

/// Pages of the upstream's list graft follows before it takes the chain for
/// a loop.
const MAX_PAGES: usize = 100;
/// Bytes of the upstream's list, all pages together, graft reads.
const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;
/// Referrers the upstream lacks that one request may HEAD-confirm; beyond
/// it they are left out (with a warning) rather than making one client wait
/// on thousands of upstream requests. `graft migrate` is the cure.
const MAX_CONFIRMS: usize = 256;
const CONFIRM_CONCURRENCY: usize = 8;

/// The union of the upstream's list and what graft knows.
pub struct Union {
    /// Ordered by digest, deduplicated.
    pub entries: Vec<Descriptor>,
    /// Entries graft added to the upstream's own list: 0 means the
    /// upstream's answer was complete.
    pub added: usize,
}

impl Referrers {
    /// The upstream's whole list for `subject`: `first` is a page already
    /// read (its body and headers) whose `Link` chain continues it; without
    /// it the walk starts at the first page (with the `artifactType`
    /// filters). Links are followed on the upstream's own origin only.
    pub async fn native_list(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_types: &[String],
        first: Option<(&[u8], &HeaderMap)>,
        auth: Option<&HeaderValue>,
    ) -> Result<Vec<Descriptor>, Error> {
        let origin = self.upstream.origin().to_owned();
        let mut entries = Vec::new();
        let mut budget = MAX_LIST_BYTES;
        let start = match first {
            Some((body, headers)) => {
                entries.extend(parse_page(body)?);
                budget = budget.saturating_sub(body.len());
                match crate::admin::next_link(headers, &origin) {
                    Some(next) => next,
                    None => return Ok(entries),
                }
            }
            None => {
                let mut p = format!("/v2/{repo}/referrers/{subject}");
                for t in artifact_types {
                    query::append(&mut p, "artifactType", t);
                }
                p
            }
        };
        let accept = [(header::ACCEPT, media::IMAGE_INDEX)];
        let mut pages = Pages::new(start, MAX_PAGES);
        while let Some(path) = pages
            .next_path()
            .map_err(|e| Error::UpstreamInvalid(e.to_string()))?
        {
            let resp = self
                .upstream
                .call(Method::GET, &path, auth, &accept, Bytes::new())
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(super::fallback::refused(&resp, &path, "GET"));
            }
            pages.followed(resp.headers(), &origin);
            let body = self.upstream.read_limited(resp.into_body(), budget).await?;
            budget = budget.saturating_sub(body.len());
            entries.extend(parse_page(&body)?);
        }
        Ok(entries)
    }

    /// `upstream` (the upstream's own list) plus the referrers of `subject`
    /// graft knows that it lacks and still holds (HEAD-confirmed with
    /// `auth`), those matching `artifact_types` only when it is not empty.
    pub async fn union(
        &self,
        repo: &RepoName,
        subject: &Digest,
        upstream: Vec<Descriptor>,
        artifact_types: &[String],
        auth: Option<&HeaderValue>,
    ) -> Result<Union, Error> {
        let known = match self.list(repo, subject, auth).await {
            Ok(Access::Granted(known)) => known,
            // The upstream just answered this client's referrers request;
            // a refused tag read only means graft adds nothing.
            Ok(Access::Denied(_)) => Vec::new(),
            Err(e) => {
                tracing::warn!(%repo, %subject, error = %e, "fallback tag unreadable; union from the index");
                self.list_indexed(repo, subject).await?
            }
        };
        let mut listed: HashSet<Digest> = HashSet::new();
        let mut entries: Vec<Descriptor> = Vec::with_capacity(upstream.len());
        for d in upstream {
            if listed.insert(d.digest.clone()) {
                entries.push(d);
            }
        }
        let mut missing: Vec<Descriptor> = known
            .into_iter()
            .filter(|d| !listed.contains(&d.digest))
            .filter(|d| {
                artifact_types.is_empty()
                    || d.artifact_type
                        .as_ref()
                        .is_some_and(|t| artifact_types.contains(t))
            })
            .collect();
        if missing.len() > MAX_CONFIRMS {
            tracing::warn!(
                %repo, %subject, missing = missing.len(), max = MAX_CONFIRMS,
                "the upstream's referrers list lacks more than graft confirms per request; \
                 the rest are left out (run `graft migrate`)"
            );
            missing.truncate(MAX_CONFIRMS);
        }
        let judged: Vec<(Descriptor, Presence)> = stream::iter(missing)
            .map(|d| async move {
                let p = self.presence(repo, &d.digest, auth).await;
                (d, p)
            })
            .buffer_unordered(CONFIRM_CONCURRENCY)
            .collect()
            .await;
        let mut confirmed = Vec::new();
        let mut gone = Vec::new();
        for (d, p) in judged {
            match p {
                Presence::Present => confirmed.push(d),
                // Deleted at the registry: out of the index (with a
                // tombstone), so it is not asked about on every query.
                Presence::Gone => gone.push(d.digest),
                Presence::Unknown => {
                    tracing::warn!(%repo, referrer = %d.digest, "the upstream could not confirm a known referrer; left out");
                }
            }
        }
        if !gone.is_empty() {
            self.forget_gone(repo, gone, None).await?;
        }
        let added = confirmed.len();
        entries.extend(confirmed);
        entries.sort_by(|a, b| a.digest.as_str().cmp(b.digest.as_str()));
        Ok(Union { entries, added })
    }
}

/// The `manifests` of one page of the upstream's referrers answer.
fn parse_page(body: &[u8]) -> Result<Vec<Descriptor>, Error> {
    serde_json::from_slice::<ImageIndex>(body)
        .map(|ix| ix.manifests)
        .map_err(|e| {
            Error::UpstreamInvalid(format!(
                "the upstream's referrers answer is not an image index: {e}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_is_not_an_index_is_the_upstreams_fault() {
        let e = parse_page(b"<html>").expect_err("not an index");
        assert!(matches!(e, Error::UpstreamInvalid(_)), "{e:?}");
        let d = Digest::sha256_of(b"x");
        let page = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"a","digest":"{d}","size":1}}]}}"#,
            media::IMAGE_INDEX
        );
        let list = parse_page(page.as_bytes()).expect("an index");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].digest, d);
    }
}
