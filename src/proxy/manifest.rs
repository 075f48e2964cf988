//! `PUT` and `DELETE` of manifests (distribution-spec "Pushing Manifests",
//! "Pushing Manifests with Subject", "Deleting Manifests"). Reads pass
//! through.
//!
//! A push body is buffered (bounded by `server.max_manifest_bytes`) and
//! forwarded byte for byte; graft only reads it to find `subject`.

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};

use super::{passthrough, pull, Outcome, Proxy};
use crate::access::Kind;
use crate::body::{self, Body, CollectError};
use crate::error::Error;
use crate::oci::{Digest, ManifestFields, Reference, RepoName};
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
            let auth = req.headers().get(header::AUTHORIZATION).cloned();
            let referrers = &proxy.referrers;
            referrers.before_delete(&name, &digest).await?;
            let resp = match passthrough::forward(proxy, req, client, outcome).await {
                Ok(r) => r,
                Err(e) => {
                    // Unknown whether the upstream deleted it: the intent
                    // stays for recovery to settle.
                    referrers.push_unresolved(&name, &digest);
                    return Err(e);
                }
            };
            let accepted = resp.status().is_success();
            if accepted {
                let _ = referrers.index().forget_present(&name, &digest);
            }
            referrers
                .after_delete(&name, &digest, accepted, auth.as_ref())
                .await?;
            Ok(resp)
        }
        (Method::GET | Method::HEAD, Reference::Digest(d)) => {
            pull::by_digest(proxy, Kind::Manifest, name, d, req, client, outcome).await
        }
        (Method::GET | Method::HEAD, Reference::Tag(t)) => {
            pull::by_tag(proxy, name, t, req, client, outcome).await
        }
        _ => passthrough::forward(proxy, req, client, outcome).await,
    }
}

async fn put(
    proxy: &Proxy,
    name: RepoName,
    reference: Reference,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let limit = proxy.config.server.max_manifest_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::ManifestTooLarge { limit });
    }
    let (parts, body) = req.into_parts();
    let bytes = match body::collect_limited(body, limit).await {
        Ok(b) => b,
        Err(CollectError::TooLarge) => return Err(Error::ManifestTooLarge { limit }),
        Err(CollectError::Broken(e)) => {
            return Err(Error::BadRequest(format!("reading the manifest body: {e}")))
        }
    };
    let auth = parts.headers.get(header::AUTHORIZATION).cloned();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let referrers = &proxy.referrers;
    let rebuild = |bytes: bytes::Bytes| Request::from_parts(parts.clone(), body::full(bytes));

    // An old client writing a fallback tag itself: serialize with graft's
    // own writes, then repair a lost read-modify-write race.
    if let Reference::Tag(tag) = &reference {
        if is_fallback_tag(tag) && referrers.upstream_is_native() != Some(true) {
            let _guard = referrers.lock_tag(&name, tag).await;
            let resp = passthrough::forward(proxy, rebuild(bytes.clone()), client, outcome).await?;
            if resp.status().is_success() {
                referrers
                    .after_client_tag_put(&name, tag, &bytes, auth.as_ref())
                    .await?;
            }
            return Ok(resp);
        }
    }

    let referrer = ManifestFields::parse(&bytes).and_then(|fields| {
        let subject = fields.subject.as_ref()?.digest.clone();
        let digest = match &reference {
            Reference::Digest(d) if d.verify(&bytes) == Some(true) => d.clone(),
            _ => Digest::sha256_of(&bytes),
        };
        let desc = fields.referrer_descriptor(digest, bytes.len() as u64, content_type.as_deref());
        Some((subject, desc))
    });
    if let Some((subject, desc)) = &referrer {
        referrers.before_push(&name, subject, desc).await?;
    }
    let forwarded = passthrough::forward(proxy, rebuild(bytes.clone()), client, outcome).await;
    if let (Ok(resp), Some(cache)) = (&forwarded, &proxy.cache) {
        if resp.status().is_success() {
            // Write-through: a CI job that pushes then pulls never goes
            // upstream for these bytes.
            let digest = Digest::sha256_of(&bytes);
            cache.mark_present(&name, &digest).await;
            cache
                .store_bytes(&digest, bytes, content_type.clone())
                .await;
        }
    }
    let Some((subject, desc)) = referrer else {
        return forwarded;
    };
    // On error it is unknown whether the upstream took the push: the intent
    // stays, and recovery asks the upstream later.
    let mut resp = match forwarded {
        Ok(r) => r,
        Err(e) => {
            referrers.push_unresolved(&name, &desc.digest);
            return Err(e);
        }
    };
    let accepted = resp.status().is_success();
    if accepted {
        // A 1.1 upstream answers with OCI-Subject itself.
        referrers.learn_native(resp.headers().contains_key(&OCI_SUBJECT));
    }
    referrers
        .after_push(&name, &subject, &desc, accepted, auth.as_ref())
        .await?;
    if accepted {
        let v = HeaderValue::from_str(subject.as_str()).expect("digests are valid header values");
        resp.headers_mut().insert(OCI_SUBJECT, v);
    }
    Ok(resp)
}
