//! Reading the upstream fallback tag (distribution-spec, "Referrers Tag
//! Schema"), which doubles as the check that the client may read the
//! repository: the HEAD carries the client's own credentials.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;

use super::{Referrers, READ_LIMIT};
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
/// `referrers.tag_ttl` > 0. Credentials are kept only as a hash.
#[derive(Default)]
pub struct RecentChecks {
    seen: Mutex<HashMap<CheckKey, Instant>>,
}

/// (repository, subject, hash of the credentials)
type CheckKey = (RepoName, Digest, crate::credentials::CredKey);

const ACCEPT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub(super) async fn read(
    r: &Referrers,
    repo: &RepoName,
    subject: &Digest,
    auth: Option<&HeaderValue>,
    use_seen: bool,
) -> Result<Access<Option<TagRead>>, Error> {
    let ttl = r.cfg.tag_ttl;
    let check_key = (repo.clone(), subject.clone(), r.keys.key(auth));
    if use_seen && !ttl.is_zero() {
        let seen = r.recent.seen.lock().expect("recent checks poisoned");
        if seen.get(&check_key).is_some_and(|t| t.elapsed() < ttl) {
            return Ok(Access::Granted(None));
        }
    }
    let mut tags = vec![subject.fallback_tag()];
    tags.extend(subject.untruncated_fallback_tag());
    let mut found = None;
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
            return Err(Error::UpstreamUnreachable(format!(
                "upstream answered {status} for the fallback tag {tag}"
            )));
        }
        let digest = head
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        found = Some((path, digest));
        break;
    }
    if !ttl.is_zero() {
        r.recent
            .seen
            .lock()
            .expect("recent checks poisoned")
            .insert(check_key, Instant::now());
    }
    let Some((path, head_digest)) = found else {
        return Ok(Access::Granted(None));
    };
    if use_seen {
        if let Some(d) = &head_digest {
            if r.index.fallback_seen(repo, subject)?.as_deref() == Some(d.as_str()) {
                return Ok(Access::Granted(None));
            }
        }
    }
    let accept = [(header::ACCEPT, ACCEPT_INDEX)];
    let resp = r
        .upstream
        .call(Method::GET, &path, auth, &accept, Bytes::new())
        .await?;
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        // Deleted between HEAD and GET.
        return Ok(Access::Granted(None));
    }
    if !status.is_success() {
        return Err(Error::UpstreamUnreachable(format!(
            "upstream answered {status} reading the fallback tag"
        )));
    }
    let bytes = r
        .upstream
        .read_limited(resp.into_body(), READ_LIMIT)
        .await?;
    Ok(Access::Granted(Some(TagRead::parse(&bytes))))
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
    let path = format!("/v2/{repo}/manifests/{tag}");
    let resp = match ask(r, Method::GET, &path, auth).await? {
        Access::Denied(d) => return Ok(Access::Denied(d)),
        Access::Granted(resp) => resp,
    };
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return Ok(Access::Granted(None));
    }
    if !status.is_success() {
        return Err(Error::UpstreamUnreachable(format!(
            "upstream answered {status} reading the fallback tag {tag}"
        )));
    }
    let bytes = r
        .upstream
        .read_limited(resp.into_body(), READ_LIMIT)
        .await?;
    Ok(Access::Granted(Some(TagRead::parse(&bytes))))
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
    fn parse(bytes: &[u8]) -> TagRead {
        let digest = Digest::sha256_of(bytes).to_string();
        // A tag that resolves to something other than an index (the subject
        // itself, on some registries) lists no referrers.
        let index = match serde_json::from_slice::<ImageIndex>(bytes) {
            Ok(i)
                if i.media_type
                    .as_deref()
                    .is_none_or(|m| m == media::IMAGE_INDEX) =>
            {
                i.manifests
            }
            _ => Vec::new(),
        };
        TagRead { digest, index }
    }
}
