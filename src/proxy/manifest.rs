//! `PUT` and `DELETE` of manifests (distribution-spec "Pushing Manifests",
//! "Pushing Manifests with Subject", "Deleting Manifests"). Reads pass
//! through.
//!
//! A push body is buffered (bounded by `server.max_manifest_bytes`) and
//! forwarded byte for byte; graft only reads it to find `subject`.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::{passthrough, pull, Outcome, Proxy};
use crate::access::Kind;
use crate::body::{self, Body, CollectError};
use crate::error::Error;
use crate::oci::{Descriptor, Digest, ErrorCode, ManifestFields, Reference, RepoName};
use crate::referrers::{is_fallback_tag, OCI_SUBJECT};
use crate::upstream::ClientSide;

pub(crate) async fn handle(
    proxy: &Proxy,
    name: RepoName,
    reference: Reference,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    match (req.method().clone(), reference) {
        (Method::PUT, reference) => put(proxy, name, reference, req, client, outcome).await,
        (Method::DELETE, Reference::Digest(digest)) => {
            delete_digest(proxy, name, digest, req, client, outcome).await
        }
        (Method::DELETE, Reference::Tag(tag)) => {
            delete_tag(proxy, name, tag, req, client, outcome).await
        }
        (Method::GET | Method::HEAD, Reference::Digest(d)) => {
            let resp = pull::by_digest(
                proxy,
                Kind::Manifest,
                name.clone(),
                d.clone(),
                req,
                client,
                outcome,
            )
            .await?;
            forget_if_gone(proxy, &name, &d, resp.status()).await;
            Ok(resp)
        }
        (Method::GET | Method::HEAD, Reference::Tag(t)) => {
            pull::by_tag(proxy, name, t, req, client, outcome).await
        }
        _ => passthrough::forward(proxy, req, client, outcome).await,
    }
}

/// The upstream's 404 to a request by digest says `name` does not hold
/// `digest` (any more): graft forgets it held it, so no later request is
/// answered from the cache without asking (distribution-spec "Deleting
/// Manifests": once deleted, a `GET` returns 404).
pub(crate) async fn forget_if_gone(
    proxy: &Proxy,
    name: &RepoName,
    digest: &Digest,
    status: StatusCode,
) {
    if let Some(cache) = proxy
        .cache
        .as_ref()
        .filter(|_| status == StatusCode::NOT_FOUND)
    {
        cache.forget_present(name, digest).await;
    }
}

/// `DELETE` by digest (end-9): forwarded; graft forgets that `name` holds
/// the digest whatever the upstream answers (a 404 means it is gone too,
/// and an error leaves it unknown: asking again costs one `HEAD`), and on
/// success drops it from the referrers it was.
async fn delete_digest(
    proxy: &Proxy,
    name: RepoName,
    digest: Digest,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let referrers = &proxy.referrers;
    referrers.before_delete(&name, &digest).await?;
    let forwarded = passthrough::forward(proxy, req, client, outcome).await;
    if let Some(cache) = &proxy.cache {
        cache.forget_present(&name, &digest).await;
    }
    let resp = match forwarded {
        Ok(r) => r,
        Err(e) => {
            // Unknown whether the upstream deleted it: the intent
            // stays for recovery to settle.
            referrers.push_unresolved(&name, &digest);
            return Err(e);
        }
    };
    let accepted = resp.status().is_success();
    referrers
        .after_delete(&name, &digest, accepted, auth.as_ref())
        .await?;
    Ok(resp)
}

/// The most of an upstream's 400 body graft reads to find its error code.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// `DELETE` by tag (end-9, "Deleting tags"): forwarded. A registry that
/// cannot delete tags must answer 400 or 405 with `UNSUPPORTED`;
/// distribution 2.x answers 400 `DIGEST_INVALID`, which graft translates.
/// A deleted tag is forgotten, so its next pull asks the upstream (and gets
/// the spec's 404).
async fn delete_tag(
    proxy: &Proxy,
    name: RepoName,
    tag: String,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let resp = passthrough::forward(proxy, req, client, outcome).await?;
    if resp.status().is_success() {
        if let Some(cache) = &proxy.cache {
            cache.forget_tag(&name, &tag).await;
        }
        return Ok(resp);
    }
    if resp.status() != StatusCode::BAD_REQUEST {
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let idle = Some(proxy.upstream.body_timeout());
    let bytes = match body::collect_limited(body, ERROR_BODY_LIMIT, idle).await {
        Ok(bytes) => bytes,
        Err(CollectError::Stalled(d)) => return Err(Error::UpstreamStalled(d)),
        Err(CollectError::TooLarge | CollectError::Broken(_)) => {
            return Err(Error::UpstreamInvalid(
                "its 400 to a tag DELETE was cut or oversized".into(),
            ))
        }
    };
    if first_error_code(&bytes).as_deref() == Some(ErrorCode::DigestInvalid.as_str()) {
        return Err(Error::TagDeletionUnsupported);
    }
    Ok(Response::from_parts(parts, body::full(bytes)))
}

/// The `code` of the first error in an OCI error body.
fn first_error_code(bytes: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(json["errors"][0]["code"].as_str()?.to_string())
}

/// A push: the body is read (bounded), then it is one of three pushes.
async fn put(
    proxy: &Proxy,
    name: RepoName,
    reference: Reference,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let limit = proxy.config.server.max_manifest_bytes;
    let (parts, bytes) = read_manifest(req, limit).await?;
    let push = Push {
        proxy,
        name,
        auth: parts.headers.get(header::AUTHORIZATION).cloned(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        parts,
        bytes,
        client,
    };
    if let Reference::Tag(tag) = &reference {
        if is_fallback_tag(tag) && proxy.referrers.upstream_is_native() != Some(true) {
            return push.client_fallback_tag(tag, outcome).await;
        }
    }
    match push.referrer(&reference) {
        Some((subject, desc)) => push.with_subject(subject, desc, outcome).await,
        None => push.forward(outcome).await,
    }
}

/// Buffers a manifest body of at most `limit` bytes, refusing a larger one
/// by its `Content-Length` before reading any of it.
async fn read_manifest(
    req: Request<Body>,
    limit: usize,
) -> Result<(http::request::Parts, Bytes), Error> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::ManifestTooLarge { limit });
    }
    let (parts, body) = req.into_parts();
    match body::collect_limited(body, limit, None).await {
        Ok(bytes) => Ok((parts, bytes)),
        Err(CollectError::TooLarge) => Err(Error::ManifestTooLarge { limit }),
        Err(CollectError::Stalled(_) | CollectError::Broken(_)) => {
            Err(Error::BadRequest("the manifest body was cut short".into()))
        }
    }
}

/// One buffered manifest push on its way upstream.
struct Push<'a> {
    proxy: &'a Proxy,
    name: RepoName,
    parts: http::request::Parts,
    bytes: Bytes,
    auth: Option<HeaderValue>,
    content_type: Option<String>,
    client: &'a ClientSide,
}

impl Push<'_> {
    /// The push as a request again, to forward.
    fn request(&self) -> Request<Body> {
        Request::from_parts(self.parts.clone(), body::full(self.bytes.clone()))
    }

    /// The subject and referrer descriptor when the manifest has `subject`.
    fn referrer(&self, reference: &Reference) -> Option<(Digest, Descriptor)> {
        let fields = ManifestFields::parse(&self.bytes)?;
        let subject = fields.subject.as_ref()?.digest.clone();
        let digest = match reference {
            Reference::Digest(d) if d.verify(&self.bytes) == Some(true) => d.clone(),
            _ => Digest::sha256_of(&self.bytes),
        };
        let size = self.bytes.len() as u64;
        let desc = fields.referrer_descriptor(digest, size, self.content_type.as_deref());
        Some((subject, desc))
    }

    /// An old client writing a fallback tag itself: serialized with graft's
    /// own writes, then a lost read-modify-write race is repaired.
    async fn client_fallback_tag(
        self,
        tag: &str,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, Error> {
        let referrers = &self.proxy.referrers;
        let _guard = referrers.lock_tag(&self.name, tag).await;
        let resp = passthrough::forward(self.proxy, self.request(), self.client, outcome).await?;
        if resp.status().is_success() {
            referrers
                .after_client_tag_put(&self.name, tag, &self.bytes, self.auth.as_ref())
                .await?;
        }
        Ok(resp)
    }

    /// A push with `subject`: its intent is recorded before it is
    /// forwarded, so a crash after the upstream accepts it loses nothing;
    /// the answer carries `OCI-Subject`.
    async fn with_subject(
        self,
        subject: Digest,
        desc: Descriptor,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, Error> {
        let referrers = self.proxy.referrers.clone();
        referrers.before_push(&self.name, &subject, &desc).await?;
        let name = self.name.clone();
        let auth = self.auth.clone();
        // On error it is unknown whether the upstream took the push: the
        // intent stays, and recovery asks the upstream later.
        let mut resp = match self.forward(outcome).await {
            Ok(r) => r,
            Err(e) => {
                referrers.push_unresolved(&name, &desc.digest);
                return Err(e);
            }
        };
        if resp.status().is_server_error() {
            // A registry may store a manifest and still answer 5xx (as
            // distribution does for deletes): the outcome is unknown, so
            // the intent stays and recovery asks the upstream.
            referrers.push_unresolved(&name, &desc.digest);
            return Ok(resp);
        }
        let accepted = resp.status().is_success();
        if accepted {
            // A 1.1 upstream answers with OCI-Subject itself.
            referrers.learn_native(resp.headers().contains_key(&OCI_SUBJECT));
        }
        referrers
            .after_push(&name, &subject, &desc, accepted, auth.as_ref())
            .await?;
        if accepted {
            let v =
                HeaderValue::from_str(subject.as_str()).expect("digests are valid header values");
            resp.headers_mut().insert(OCI_SUBJECT, v);
        }
        Ok(resp)
    }

    /// Forwards the push; an accepted one is written through to the cache.
    async fn forward(self, outcome: &mut Outcome) -> Result<Response<Body>, Error> {
        let resp = passthrough::forward(self.proxy, self.request(), self.client, outcome).await?;
        if let Some(cache) = &self.proxy.cache {
            if resp.status().is_success() {
                // Write-through: a CI job that pushes then pulls never goes
                // upstream for these bytes.
                let digest = Digest::sha256_of(&self.bytes);
                cache.mark_present(&self.name, &digest).await;
                cache
                    .store_bytes(&digest, self.bytes, self.content_type)
                    .await;
            }
        }
        Ok(resp)
    }
}
