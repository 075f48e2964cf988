//! `GET`/`HEAD` of blobs and manifests (distribution-spec "Pulling blobs",
//! "Pulling manifests") through the cache: HTTP mapped onto the cache's
//! contract (`cache::ContentCache::lookup`, `resolve_tag`).
//!
//! By digest the content is immutable: a hit is served from disk after the
//! authorization check; a miss is fetched once, however many clients ask,
//! and streamed to all of them while it is written and verified. A tag is
//! resolved to a digest by the cache, revalidated with a HEAD upstream
//! (HEADs do not count against registry pull limits), then served by digest.

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::serve::{content_response, serve_hit, Want};
use super::{head_only, passthrough, Outcome, Proxy};
use crate::access::{is_outage, Decision, Kind};
use crate::body::{self, Body};
use crate::cache::{Followed, Lookup, Revalidation, Store, Streaming, TagAnswer};
use crate::error::Error;
use crate::metrics;
use crate::oci::{Digest, RepoName};
use crate::upstream::ClientSide;

/// Redirects graft follows itself when fetching content to cache (object
/// storage behind a registry answers blob GETs with 307).
const MAX_REDIRECTS: usize = 5;

/// GET/HEAD by digest.
pub(crate) async fn by_digest(
    proxy: &Proxy,
    kind: Kind,
    name: RepoName,
    digest: Digest,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let Some(cache) = proxy.cache.as_ref().filter(|_| Store::cacheable(&digest)) else {
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    // Partial and header-only requests of uncached content pass through:
    // caching starts with a full GET.
    if req.method() != Method::GET || req.headers().contains_key(header::RANGE) {
        let Some(hit) = cache.hit(&digest, kind == Kind::Manifest).await else {
            return passthrough::forward(proxy, req, client, outcome).await;
        };
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        return match allowed(proxy, kind, &name, &digest, auth.as_ref()).await {
            Ok(true) => Ok(serve_hit(proxy, cache, kind, &digest, hit, &Want::of(&req))),
            Ok(false) => passthrough::forward(proxy, req, client, outcome).await,
            Err(e) => Err(e),
        };
    }
    fetch(proxy, kind, name, digest, req, client, outcome).await
}

/// Whether the upstream lets this client read `digest` from `name`;
/// `Ok(false)` means it said no, and it should answer the request itself so
/// the client sees exactly its status, challenge and body.
async fn allowed(
    proxy: &Proxy,
    kind: Kind,
    name: &RepoName,
    digest: &Digest,
    auth: Option<&HeaderValue>,
) -> Result<bool, Error> {
    match proxy.access.check(kind, name, digest, auth).await {
        Decision::Allowed => Ok(true),
        Decision::Denied => Ok(false),
        Decision::Unreachable(e) => Err(e),
    }
}

/// A full GET: a hit, the lead of a fill, or a follower of one.
async fn fetch(
    proxy: &Proxy,
    kind: Kind,
    name: RepoName,
    digest: Digest,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let cache = proxy
        .cache
        .as_ref()
        .expect("fetch is reached only with a cache");
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let auth = auth.as_ref();
    let cred = proxy.access.key(auth);
    let manifest = kind == Kind::Manifest;
    loop {
        let streaming = match cache.lookup(&name, &digest, cred, manifest).await {
            Lookup::Hit(hit) => {
                if !allowed(proxy, kind, &name, &digest, auth).await? {
                    return passthrough::forward(proxy, req, client, outcome).await;
                }
                return Ok(serve_hit(proxy, cache, kind, &digest, hit, &Want::of(&req)));
            }
            Lookup::Follow(follow) => {
                // The leader's 200 answers for the same credentials on the
                // same repository; anyone else asks for themselves.
                let vouched = follow.led_by(&name, cred);
                let followed = follow.wait().await;
                if matches!(followed, Followed::Abandoned) {
                    continue;
                }
                if !vouched && !allowed(proxy, kind, &name, &digest, auth).await? {
                    return passthrough::forward(proxy, req, client, outcome).await;
                }
                match followed {
                    Followed::Streaming(s) => s,
                    Followed::Failed(why) => {
                        return Err(Error::UpstreamUnreachable(format!(
                            "fetching {digest}: {why}"
                        )))
                    }
                    Followed::Abandoned => continue,
                }
            }
            Lookup::Miss(miss) => {
                let up_req = proxy.upstream.forward_request(head_only(&req), client)?;
                let (resp, took) = proxy.upstream.send(up_req).await?;
                outcome.upstream = Some(took);
                proxy.metrics.upstream_latency(took);
                let resp = follow_redirects(proxy, resp, auth).await?;
                if resp.status() != StatusCode::OK {
                    // Not content for the cache (401, 404, an unfollowable
                    // redirect…): the client gets the upstream's answer as
                    // is; dropping the miss lets followers ask for themselves.
                    drop(miss);
                    return passthrough::relay(proxy, resp, client);
                }
                proxy.access.remember_yes(&name, auth);
                match miss.fill(resp, proxy.upstream.body_timeout()).await {
                    Ok(streaming) => streaming,
                    Err(unfilled) => {
                        let (error, resp) = unfilled.into_parts();
                        tracing::warn!(%digest, %error, "the cache cannot take this content; streaming it uncached");
                        return passthrough::relay(proxy, resp, client);
                    }
                }
            }
        };
        return Ok(streamed(kind, &digest, streaming));
    }
}

fn streamed(kind: Kind, digest: &Digest, streaming: Streaming) -> Response<Body> {
    let (body, len, content_type) = streaming.into_parts();
    content_response(
        kind,
        digest,
        content_type.as_deref(),
        len,
        body::boxed(body),
    )
}

/// Follows redirects to other hosts without the client's `Authorization`
/// (credentials never go to a different host); same-host redirects keep it.
async fn follow_redirects(
    proxy: &Proxy,
    mut resp: Response<Incoming>,
    auth: Option<&HeaderValue>,
) -> Result<Response<Incoming>, Error> {
    for _ in 0..MAX_REDIRECTS {
        if !resp.status().is_redirection() {
            return Ok(resp);
        }
        let Some(location) = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        else {
            return Ok(resp);
        };
        let target = if location.starts_with('/') {
            format!("{}{location}", proxy.upstream.origin())
        } else {
            location
        };
        let same_host = proxy.upstream.is_own_url(&target);
        let next = proxy
            .upstream
            .get_url(&target, if same_host { auth } else { None })
            .await?;
        resp = next;
    }
    Ok(resp)
}

/// GET/HEAD by tag: the cache resolves it (revalidating with a HEAD
/// upstream when needed); the content is then served by digest.
pub(crate) async fn by_tag(
    proxy: &Proxy,
    name: RepoName,
    tag: String,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let Some(cache) = proxy.cache.as_ref() else {
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let auth = auth.as_ref();
    let cred = proxy.access.key(auth);
    let mut head = head_only(&req);
    *head.method_mut() = Method::HEAD;
    let answer = cache
        .resolve_tag(
            &name,
            &tag,
            proxy.access.fresh_yes(&name, cred),
            || proxy.access.stale_yes(&name, auth),
            revalidate(proxy, &name, auth, head, client, outcome),
        )
        .await;
    let digest = match answer {
        TagAnswer::Hit { digest, hit, fresh } => {
            if fresh {
                metrics::inc(&proxy.metrics.auth_remembered);
            }
            let want = Want::of(&req);
            return Ok(serve_hit(proxy, cache, Kind::Manifest, &digest, hit, &want));
        }
        TagAnswer::Uncached { digest } => digest,
        TagAnswer::Unresolved(Revalidation::Outage { error: Some(e), .. }) => return Err(e),
        // 401, 404, a 429/5xx without a stale answer, or no digest to go
        // by: the upstream answers the request itself.
        TagAnswer::Unresolved(_) => return passthrough::forward(proxy, req, client, outcome).await,
    };
    if req.method() != Method::GET || !Store::cacheable(&digest) {
        return passthrough::forward(proxy, req, client, outcome).await;
    }
    // Fetch by digest, so the cached copy is exactly what the tag named.
    let mut by_digest_req = head_only(&req);
    let pq = format!("/v2/{name}/manifests/{digest}");
    *by_digest_req.uri_mut() = pq
        .parse()
        .map_err(|e| Error::Internal(format!("uri: {e}")))?;
    let req = by_digest_req;
    fetch(proxy, Kind::Manifest, name, digest, req, client, outcome).await
}

/// Asks the upstream which digest the tag names now (a HEAD with the
/// client's own credentials).
async fn revalidate(
    proxy: &Proxy,
    name: &RepoName,
    auth: Option<&HeaderValue>,
    head: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Revalidation {
    let answer = match proxy.upstream.forward_request(head, client) {
        Ok(up_req) => proxy.upstream.send(up_req).await.map_err(Error::from),
        Err(e) => Err(e),
    };
    let resp = match answer {
        Ok((resp, took)) => {
            outcome.upstream = Some(took);
            proxy.metrics.upstream_latency(took);
            resp
        }
        Err(e) => {
            return Revalidation::Outage {
                why: e.to_string(),
                error: Some(e),
            }
        }
    };
    let status = resp.status();
    if is_outage(status) {
        let why = format!("upstream answered {status}");
        return Revalidation::Outage { why, error: None };
    }
    let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok());
    let digest = header("docker-content-digest").and_then(|v| v.parse::<Digest>().ok());
    let (true, Some(digest)) = (status.is_success(), digest) else {
        return Revalidation::Other;
    };
    let media_type = header(header::CONTENT_TYPE.as_str()).map(str::to_string);
    proxy.access.remember_yes(name, auth);
    Revalidation::Current { digest, media_type }
}
