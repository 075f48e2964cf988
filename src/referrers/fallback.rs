//! Reading the upstream fallback tag (distribution-spec, "Referrers Tag
//! Schema"), which doubles as the check that the client may read the
//! repository: the HEAD carries the client's own credentials.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;

use super::{Referrers, READ_LIMIT};
use crate::clock::Clock;
use crate::error::Error;
use crate::oci::{media, Descriptor, Digest, ImageIndex, RepoName};

/// The upstream's answer to "may this client read the repository?".
pub enum Access<T> {
    Granted(T),
    /// 401/403 from the upstream: passed to the client as it came.
    Denied(Denial),
}

#[derive(Debug, Clone)]
pub struct Denial {
    pub status: StatusCode,
    pub www_authenticate: Option<HeaderValue>,
}

/// A fallback tag that was read: its digest and entries.
pub struct TagRead {
    pub digest: String,
    pub index: Vec<Descriptor>,
}

/// When each (repository, subject, credentials) last passed a HEAD, for
/// `referrers.tag_ttl` > 0. Credentials are kept only as their HMAC.
///
/// Bounded twice: entries expire after `tag_ttl` (moka's own timer frees
/// the memory) and at most `capacity` are kept (moka evicts the least
/// useful beyond it). Whether a check still stands is judged by the
/// config's [`Clock`], so tests move time instead of sleeping.
pub(crate) struct RecentChecks {
    /// `None` when `tag_ttl` is 0: every query checks.
    seen: Option<moka::sync::Cache<CheckKey, u64>>,
    ttl: Duration,
    clock: Clock,
}

/// (repository, subject, HMAC of the credentials)
type CheckKey = (RepoName, Digest, crate::credentials::CredKey);

impl RecentChecks {
    pub(crate) fn new(ttl: Duration, capacity: u64, clock: Clock) -> RecentChecks {
        let seen = (!ttl.is_zero() && capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build()
        });
        RecentChecks { seen, ttl, clock }
    }

    /// Whether `key` passed a HEAD less than `tag_ttl` ago.
    fn stands(&self, key: &CheckKey) -> bool {
        let Some(seen) = &self.seen else {
            return false;
        };
        seen.get(key).is_some_and(|at_ms| {
            self.clock.now_millis().saturating_sub(at_ms) < self.ttl.as_millis() as u64
        })
    }

    fn passed(&self, key: CheckKey) {
        if let Some(seen) = &self.seen {
            seen.insert(key, self.clock.now_millis());
        }
    }

    /// Checks remembered now (after pending evictions are applied).
    pub(crate) fn len(&self) -> u64 {
        self.seen.as_ref().map_or(0, |s| {
            s.run_pending_tasks();
            s.entry_count()
        })
    }
}

const ACCEPT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub(super) async fn read(
    r: &Referrers,
    repo: &RepoName,
    subject: &Digest,
    auth: Option<&HeaderValue>,
    use_seen: bool,
) -> Result<Access<Option<TagRead>>, Error> {
    let check_key = (repo.clone(), subject.clone(), r.keys.key(auth));
    if use_seen && r.recent.stands(&check_key) {
        return Ok(Access::Granted(None));
    }
    let found = match head_tag(r, repo, subject, auth).await? {
        Access::Denied(d) => return Ok(Access::Denied(d)),
        Access::Granted(found) => found,
    };
    r.recent.passed(check_key);
    let Some((path, head_digest)) = found else {
        return Ok(Access::Granted(None));
    };
    if use_seen {
        if let Some(d) = head_digest {
            let (ix, repo, subject) = (r.index.clone(), repo.clone(), subject.clone());
            let seen = ix
                .blocking(move |ix| ix.referrers().fallback_seen(&repo, &subject))
                .await?;
            if seen.as_deref() == Some(d.as_str()) {
                return Ok(Access::Granted(None));
            }
        }
    }
    // Gone between the HEAD and the GET reads as no tag.
    get_tag(r, &path, auth).await
}

/// The digest of the fallback tag of `subject` as the upstream holds it
/// now (`None`: no tag), for verifying a write: a HEAD, and a GET only
/// when the HEAD names no digest.
pub(super) async fn tag_digest(
    r: &Referrers,
    repo: &RepoName,
    subject: &Digest,
    auth: Option<&HeaderValue>,
) -> Result<Option<String>, Error> {
    let denied = |d: Denial| Error::UpstreamRefused {
        status: d.status,
        what: format!("graft's check of the fallback tag of {subject} in {repo}"),
    };
    let (path, digest) = match head_tag(r, repo, subject, auth).await? {
        Access::Denied(d) => return Err(denied(d)),
        Access::Granted(None) => return Ok(None),
        Access::Granted(Some(found)) => found,
    };
    if digest.is_some() {
        return Ok(digest);
    }
    match get_tag(r, &path, auth).await? {
        Access::Denied(d) => Err(denied(d)),
        Access::Granted(t) => Ok(t.map(|t| t.digest)),
    }
}

/// HEADs the fallback tag of `subject` (and its untruncated form, for long
/// digests): the path and digest of the first that exists, if any.
async fn head_tag(
    r: &Referrers,
    repo: &RepoName,
    subject: &Digest,
    auth: Option<&HeaderValue>,
) -> Result<Access<Option<(String, Option<String>)>>, Error> {
    let mut tags = vec![subject.fallback_tag()];
    tags.extend(subject.untruncated_fallback_tag());
    for tag in &tags {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let head = match ask(r, Method::HEAD, &path, auth).await? {
            Access::Denied(d) => return Ok(Access::Denied(d)),
            Access::Granted(head) => head,
        };
        let status = head.status();
        if status == StatusCode::NOT_FOUND {
            continue;
        }
        if !status.is_success() {
            return Err(refused(&head, &path, "HEAD"));
        }
        let digest = head
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        return Ok(Access::Granted(Some((path, digest))));
    }
    Ok(Access::Granted(None))
}

/// The upstream's non-success answer to graft's own fallback-tag request:
/// its answer (a 429 stays a 429 with its `Retry-After`, a 5xx becomes a
/// 502), never graft's 500.
pub(super) fn refused<B>(resp: &Response<B>, path: &str, method: &str) -> Error {
    let what = format!("graft's {method} {path}");
    match resp.status() {
        StatusCode::TOO_MANY_REQUESTS => Error::UpstreamThrottled {
            retry_after: resp.headers().get(header::RETRY_AFTER).cloned(),
            what,
        },
        status => Error::UpstreamRefused { status, what },
    }
}

/// Reads a fallback tag's body: at most [`READ_LIMIT`] bytes (more is the
/// upstream's fault), with no silence longer than `upstream.body_timeout`
/// (a stalled body must not hold the tag's write lock forever).
async fn read_tag_body(r: &Referrers, body: Incoming) -> Result<Bytes, Error> {
    Ok(r.upstream.read_limited(body, READ_LIMIT).await?)
}

/// Reads the fallback tag `tag` by name, without the HEAD and without
/// knowing its subject (a reindex walks tags, and truncated tags do not
/// name their subject whole).
pub(super) async fn fetch(
    r: &Referrers,
    repo: &RepoName,
    tag: &str,
    auth: Option<&HeaderValue>,
) -> Result<Access<Option<TagRead>>, Error> {
    get_tag(r, &format!("/v2/{repo}/manifests/{tag}"), auth).await
}

/// GETs and parses the fallback tag at `path`; `None` when it does not
/// exist, [`Access::Denied`] on the upstream's 401/403.
async fn get_tag(
    r: &Referrers,
    path: &str,
    auth: Option<&HeaderValue>,
) -> Result<Access<Option<TagRead>>, Error> {
    let resp = match ask(r, Method::GET, path, auth).await? {
        Access::Denied(d) => return Ok(Access::Denied(d)),
        Access::Granted(resp) => resp,
    };
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return Ok(Access::Granted(None));
    }
    if !status.is_success() {
        return Err(refused(&resp, path, "GET"));
    }
    let bytes = read_tag_body(r, resp.into_body()).await?;
    Ok(Access::Granted(Some(TagRead::parse(&bytes)?)))
}

/// Sends `method` for a fallback tag at `path`, asking for an index; a
/// 401/403 is the upstream's "no" to the credentials, any other answer is
/// the caller's to read.
async fn ask(
    r: &Referrers,
    method: Method,
    path: &str,
    auth: Option<&HeaderValue>,
) -> Result<Access<Response<Incoming>>, Error> {
    // distribution 2.8 answers 404 for an index unless asked for one.
    let accept = [(header::ACCEPT, ACCEPT_INDEX)];
    let resp = r
        .upstream
        .call(method, path, auth, &accept, Bytes::new())
        .await?;
    let status = resp.status();
    if crate::upstream::is_denial(status) {
        return Ok(Access::Denied(Denial {
            status,
            www_authenticate: resp.headers().get(header::WWW_AUTHENTICATE).cloned(),
        }));
    }
    Ok(Access::Granted(resp))
}

impl TagRead {
    /// A body that is not JSON at all is the upstream's fault. A tag that
    /// resolves to something other than an index (the subject itself, on
    /// some registries) lists no referrers.
    fn parse(bytes: &[u8]) -> Result<TagRead, Error> {
        let digest = Digest::sha256_of(bytes).to_string();
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::UpstreamInvalid(format!("fallback tag is not JSON: {e}")))?;
        let index = match serde_json::from_value::<ImageIndex>(value) {
            Ok(i)
                if i.media_type
                    .as_deref()
                    .is_none_or(|m| m == media::IMAGE_INDEX) =>
            {
                i.manifests
            }
            _ => Vec::new(),
        };
        Ok(TagRead { digest, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_checks_stay_within_their_capacity() {
        let checks = RecentChecks::new(Duration::from_secs(3600), 1000, Clock::system());
        let repo = RepoName::parse("ci/app").expect("name");
        for i in 0..100_000u32 {
            let subject = Digest::sha256_of(&i.to_be_bytes());
            checks.passed((repo.clone(), subject, [0; 32]));
        }
        assert!(checks.len() <= 1000, "{} entries", checks.len());
        assert!(checks.len() > 0);
    }

    #[test]
    fn a_recent_check_stands_for_tag_ttl_of_the_config_clock() {
        let clock = Clock::skewable();
        let checks = RecentChecks::new(Duration::from_secs(60), 10, clock.clone());
        let key = (
            RepoName::parse("a").expect("name"),
            Digest::sha256_of(b"s"),
            [1; 32],
        );
        assert!(!checks.stands(&key));
        checks.passed(key.clone());
        assert!(checks.stands(&key));
        clock.advance(Duration::from_secs(60));
        assert!(!checks.stands(&key));
        let off = RecentChecks::new(Duration::ZERO, 10, clock);
        off.passed(key.clone());
        assert!(!off.stands(&key));
    }

    #[test]
    fn a_tag_body_that_is_not_json_is_the_upstreams_fault() {
        assert!(matches!(
            TagRead::parse(b"<html>"),
            Err(Error::UpstreamInvalid(_))
        ));
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert!(TagRead::parse(manifest)
            .expect("a manifest")
            .index
            .is_empty());
    }
}
