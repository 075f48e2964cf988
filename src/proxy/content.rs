//! `GET`/`HEAD` of blobs and manifests (distribution-spec "Pulling blobs",
//! "Pulling manifests") through the cache.
//!
//! By digest the content is immutable: a hit is served from disk after the
//! authorization check; a miss is fetched once, however many clients ask,
//! and streamed to all of them while it is written and verified. A tag is
//! resolved to a digest with a HEAD upstream (HEADs do not count against
//! registry pull limits), then served by digest; while the upstream is
//! unreachable the last known digest stands for `cache.max_stale`.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{head_only, passthrough, Outcome, Proxy};
use crate::access::{is_outage, Decision, Kind};
use crate::body::{self, Body};
use crate::cache::{now_secs, Claim, ContentCache, FileBody, FillState, Hit, Store};
use crate::error::{oci_error, Error};
use crate::index::TagRecord;
use crate::metrics;
use crate::oci::{Digest, ErrorCode, RepoName};
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
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    if let Some(hit) = cache.hit(&digest, kind == Kind::Manifest) {
        let decision = proxy
            .access
            .check(kind, &name, &digest, auth.as_ref())
            .await;
        return match decision {
            Decision::Allowed => Ok(serve_hit(
                proxy,
                cache,
                kind,
                &digest,
                hit,
                &Want::of(&req),
                None,
            )),
            // The upstream says no: let it answer the request itself, so
            // the client sees exactly its status, challenge and body.
            Decision::Denied => passthrough::forward(proxy, req, client, outcome).await,
            Decision::Unreachable(e) => Err(e),
        };
    }
    // Partial and header-only requests of uncached content pass through:
    // caching starts with a full GET.
    if req.method() != Method::GET || req.headers().contains_key(header::RANGE) {
        return passthrough::forward(proxy, req, client, outcome).await;
    }
    fetch(proxy, kind, name, digest, req, client, outcome).await
}

/// A miss: lead the fill or follow the one in flight.
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
    let cred = proxy.access.key(auth.as_ref());
    loop {
        let lead = match cache.claim(&digest, name.as_str(), cred) {
            Claim::Lead(lead) => lead,
            Claim::Follow(fill) => {
                metrics::inc(&proxy.metrics.coalesced_waiters);
                let state = fill.settled().await;
                if state == FillState::Abandoned {
                    continue;
                }
                // The leader's 200 answers for the same credentials on the
                // same repository; anyone else asks for themselves.
                if fill.leader != (name.as_str().to_string(), cred) {
                    match proxy
                        .access
                        .check(kind, &name, &digest, auth.as_ref())
                        .await
                    {
                        Decision::Allowed => {}
                        Decision::Denied => {
                            return passthrough::forward(proxy, req, client, outcome).await
                        }
                        Decision::Unreachable(e) => return Err(e),
                    }
                }
                if let FillState::Failed(why) = &state {
                    return Err(Error::UpstreamUnreachable(format!(
                        "fetching {digest}: {why}"
                    )));
                }
                if let Some(hit) = cache.hit(&digest, kind == Kind::Manifest) {
                    return Ok(serve_hit(
                        proxy,
                        cache,
                        kind,
                        &digest,
                        hit,
                        &Want::of(&req),
                        None,
                    ));
                }
                let Some(opened) = fill.opened() else {
                    continue;
                };
                let body = FileBody::following(opened.file, opened.len, fill.subscribe());
                return Ok(content_response(
                    kind,
                    &digest,
                    opened.content_type.as_deref(),
                    opened.len,
                    body::boxed(body),
                ));
            }
        };
        metrics::inc(&proxy.metrics.cache_misses);
        let up_req = proxy.upstream.forward_request(head_only(&req), client)?;
        let (resp, took) = proxy.upstream.send(up_req).await?;
        outcome.upstream = Some(took);
        proxy.metrics.upstream_latency(took);
        let resp = follow_redirects(proxy, resp, auth.as_ref()).await?;
        if resp.status() != StatusCode::OK {
            // Not content for the cache (401, 404, an unfollowable
            // redirect…): the client gets the upstream's answer as is;
            // followers ask for themselves.
            drop(lead);
            let (mut parts, incoming) = resp.into_parts();
            proxy
                .upstream
                .rewrite_response_headers(&mut parts.headers, client);
            return Ok(Response::from_parts(parts, body::boxed(incoming)));
        }
        proxy.access.remember_yes(&name, cred);
        proxy.referrers.index().present().mark(&name, &digest);
        let len = content_length(resp.headers());
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let fill = lead.start(
            &cache.store,
            resp.into_body(),
            len,
            content_type.clone(),
            cache.on_commit(),
        )?;
        let opened = fill.opened().expect("a started fill is open");
        let body = FileBody::following(opened.file, len, fill.subscribe());
        return Ok(content_response(
            kind,
            &digest,
            content_type.as_deref(),
            len,
            body::boxed(body),
        ));
    }
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

/// GET/HEAD by tag: resolve with a HEAD upstream, serve by digest.
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
    let index = proxy.referrers.index();
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let cred = proxy.access.key(auth.as_ref());
    let known = index.tags().get(&name, &tag).ok().flatten();
    let cfg = cache.config();
    let want = Want::of(&req);

    // Within tag_ttl and auth_ttl nothing needs the upstream.
    if let Some(rec) = &known {
        let fresh = !cfg.tag_ttl.is_zero()
            && now_secs().saturating_sub(rec.checked) < cfg.tag_ttl.as_secs();
        if fresh && proxy.access.fresh_yes(&name, cred) {
            if let Some(hit) = cache.hit(&rec.digest, true) {
                metrics::inc(&proxy.metrics.auth_remembered);
                return Ok(serve_hit(
                    proxy,
                    cache,
                    Kind::Manifest,
                    &rec.digest,
                    hit,
                    &want,
                    rec.media_type.as_deref(),
                ));
            }
        }
    }

    let mut head = head_only(&req);
    *head.method_mut() = Method::HEAD;
    let up_req = proxy.upstream.forward_request(head, client)?;
    let answer = proxy.upstream.send(up_req).await;
    // Only an outage needs a remembered yes (possibly an index read).
    let offline = answer.as_ref().map_or(true, |(r, _)| is_outage(r.status()));
    let vouched = offline && proxy.access.stale_yes(&name, cred).await;
    let stale = |why: String| -> Option<Response<Body>> {
        let rec = known.as_ref()?;
        let age = now_secs().saturating_sub(rec.checked);
        if age >= cfg.max_stale.as_secs() || !vouched {
            return None;
        }
        let hit = cache.hit(&rec.digest, true)?;
        tracing::warn!(repo = %name, %tag, digest = %rec.digest, age_secs = age, reason = %why, "upstream unavailable; serving the last known tag digest");
        metrics::inc(&proxy.metrics.tag_stale_served);
        Some(serve_hit(
            proxy,
            cache,
            Kind::Manifest,
            &rec.digest,
            hit,
            &want,
            rec.media_type.as_deref(),
        ))
    };
    let resp = match answer {
        Ok((resp, took)) => {
            outcome.upstream = Some(took);
            proxy.metrics.upstream_latency(took);
            resp
        }
        Err(e) => {
            return match stale(e.to_string()) {
                Some(r) => Ok(r),
                None => Err(e.into()),
            }
        }
    };
    let status = resp.status();
    if is_outage(status) {
        if let Some(r) = stale(format!("upstream answered {status}")) {
            return Ok(r);
        }
    }
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let (true, Some(digest)) = (status.is_success(), digest) else {
        // 401, 404, an outage without a stale answer, or no digest to go
        // by: the upstream answers the request itself.
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    proxy.access.remember_yes(&name, cred);
    index.present().mark(&name, &digest);
    index.tags().set(
        &name,
        &tag,
        &TagRecord {
            digest: digest.clone(),
            media_type: media_type.clone(),
            checked: now_secs(),
        },
    );
    if let Some(hit) = cache.hit(&digest, true) {
        return Ok(serve_hit(
            proxy,
            cache,
            Kind::Manifest,
            &digest,
            hit,
            &want,
            media_type.as_deref(),
        ));
    }
    if req.method() != Method::GET || !Store::cacheable(&digest) {
        return passthrough::forward(proxy, req, client, outcome).await;
    }
    // Fetch by digest, so the cached copy is exactly what the tag named.
    let mut by_digest_req = head_only(&req);
    let pq = format!("/v2/{name}/manifests/{digest}");
    *by_digest_req.uri_mut() = pq
        .parse()
        .map_err(|e| Error::Internal(format!("uri: {e}")))?;
    fetch(
        proxy,
        Kind::Manifest,
        name,
        digest,
        by_digest_req,
        client,
        outcome,
    )
    .await
}

/// Serves a committed file: the whole of it, or one `Range`.
fn serve_hit(
    proxy: &Proxy,
    cache: &ContentCache,
    kind: Kind,
    digest: &Digest,
    hit: Hit,
    want: &Want,
    media_type: Option<&str>,
) -> Response<Body> {
    metrics::inc(&proxy.metrics.cache_hits);
    cache.touch(digest);
    let head = want.head;
    let media_type = media_type.or(hit.media_type.as_deref()).map(str::to_string);
    let range = want.range.as_deref().map(|r| parse_range(r, hit.len));
    let (start, end, partial) = match range {
        None | Some(RangeAnswer::Ignore) => (0, hit.len, false),
        Some(RangeAnswer::Unsatisfiable) => {
            let mut resp = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::BlobUnknown,
                "requested range not satisfiable",
                serde_json::Value::Null,
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", hit.len)) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return resp;
        }
        Some(RangeAnswer::Range(s, e)) => (s, e, true),
    };
    let body = if head {
        body::empty()
    } else {
        metrics::add(&proxy.metrics.cache_bytes_served, end - start);
        body::boxed(FileBody::committed(hit.file, start, end))
    };
    let mut resp = content_response(kind, digest, media_type.as_deref(), Some(end - start), body);
    if partial {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{}", end - 1, hit.len)) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

fn content_response(
    kind: Kind,
    digest: &Digest,
    media_type: Option<&str>,
    len: Option<u64>,
    body: Body,
) -> Response<Body> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    let ct = match (kind, media_type) {
        (_, Some(m)) => {
            HeaderValue::from_str(m).unwrap_or(HeaderValue::from_static("application/octet-stream"))
        }
        (Kind::Blob, None) => HeaderValue::from_static("application/octet-stream"),
        (Kind::Manifest, None) => HeaderValue::from_static(crate::oci::media::IMAGE_MANIFEST),
    };
    h.insert(header::CONTENT_TYPE, ct);
    if let Some(n) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let d = HeaderValue::from_str(digest.as_str()).expect("digests are valid header values");
    h.insert("docker-content-digest", d);
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, etag);
    }
    if kind == Kind::Blob {
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

enum RangeAnswer {
    Range(u64, u64),
    Unsatisfiable,
    /// Not a single byte range graft serves (multiple ranges, other units):
    /// answer with the whole content, as RFC 9110 §14.2 allows.
    Ignore,
}

/// Parses a single `bytes=` range against a length; the range is `[a, b)`.
fn parse_range(value: &str, len: u64) -> RangeAnswer {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Ignore;
    };
    if spec.contains(',') {
        return RangeAnswer::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAnswer::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match parse(b) {
            Some(n) if n > 0 && len > 0 => RangeAnswer::Range(len.saturating_sub(n), len),
            _ => RangeAnswer::Unsatisfiable,
        },
        // bytes=a-
        (false, true) => match parse(a) {
            Some(s) if s < len => RangeAnswer::Range(s, len),
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Ignore,
        },
        (false, false) => match (parse(a), parse(b)) {
            (Some(s), Some(e)) if s <= e && s < len => RangeAnswer::Range(s, (e + 1).min(len)),
            (Some(_), Some(_)) => RangeAnswer::Unsatisfiable,
            _ => RangeAnswer::Ignore,
        },
        (true, true) => RangeAnswer::Ignore,
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// What of the client's request a cache answer depends on.
struct Want {
    head: bool,
    range: Option<String>,
}

impl Want {
    fn of(req: &Request<Body>) -> Want {
        Want {
            head: req.method() == Method::HEAD,
            range: req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, len: u64) -> Option<(u64, u64)> {
        match parse_range(v, len) {
            RangeAnswer::Range(a, b) => Some((a, b)),
            RangeAnswer::Unsatisfiable => Some((u64::MAX, u64::MAX)),
            RangeAnswer::Ignore => None,
        }
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        const BAD: Option<(u64, u64)> = Some((u64::MAX, u64::MAX));
        assert_eq!(range("bytes=10-19", 100), Some((10, 20)));
        assert_eq!(range("bytes=90-200", 100), Some((90, 100)));
        assert_eq!(range("bytes=90-", 100), Some((90, 100)));
        assert_eq!(range("bytes=-10", 100), Some((90, 100)));
        assert_eq!(range("bytes=-200", 100), Some((0, 100)));
        assert_eq!(range("bytes=500-0", 100), BAD);
        assert_eq!(range("bytes=100-", 100), BAD);
        assert_eq!(range("bytes=-0", 100), BAD);
        assert_eq!(range("bytes=0-1,5-6", 100), None);
        assert_eq!(range("items=0-1", 100), None);
    }
}
