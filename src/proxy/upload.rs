//! Blob uploads (distribution-spec "Pushing blobs": monolithic POST,
//! POST + PUT, chunked PATCHes): passed through, streaming, and teed into
//! the cache when graft sees every byte (see `cache::upload`).
//!
//! For an upload graft saw start, it also answers what distribution 2.8
//! gets wrong ("Pushing a blob in chunks"): a chunk whose `Content-Range`
//! does not start at the session's offset gets 416 with `Location` and
//! `Range` (distribution appends it wherever it starts), and `GET` on the
//! session gets 204 with them (distribution answers 404 to a `Location` a
//! chunk ago). graft answers from its own state only to the client that
//! started the session (same credentials, or same address when anonymous)
//! presenting a `_state` graft handed out for it; every other request on
//! an upload — a session graft does not know, lost track of, or another
//! client's — passes through as it came.
//!
//! A completed upload whose digest the upstream answers with another one
//! (distribution 2.8 accepts `sha512:` and stores sha256) is refused with
//! 400 `DIGEST_INVALID`, and nothing is cached.

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::{passthrough, Outcome, Proxy};
use crate::body::{self, Body};
use std::sync::Arc;

use crate::cache::{ContentCache, Owner, Session, Teed};
use crate::error::Error;
use crate::oci::{query, Digest, RepoName};
use crate::upstream::ClientSide;

const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// `POST /v2/<name>/blobs/uploads/`
pub(crate) async fn start(
    proxy: &Proxy,
    name: RepoName,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let Some(cache) = proxy
        .cache
        .as_ref()
        .filter(|_| req.method() == Method::POST)
    else {
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    let owner = owner_of(proxy, &req, client);
    let query = Query::of(&req);
    let resp = match query.digest.filter(|_| !query.mount) {
        // Monolithic: the whole blob is this request's body.
        Some(digest) => {
            let session = cache.upload_session(owner.clone());
            let (req, teed) = tee(req, &session);
            let resp = passthrough::forward(proxy, req, client, outcome).await?;
            complete(cache, &name, &digest, &session, teed, resp).await?
        }
        None => passthrough::forward(proxy, req, client, outcome).await?,
    };
    // Also a mount that fell back to an upload, or a monolithic POST the
    // upstream turned into a session (distribution 2.8 does).
    if resp.status() == StatusCode::ACCEPTED {
        if let Some(id) = upload_id(&resp) {
            if let Some(session) = cache.begin_upload(&id, owner) {
                session.answered(Some(0), resp.headers().get(header::LOCATION).cloned());
            }
        }
    }
    Ok(resp)
}

/// `PATCH`/`PUT`/`DELETE`/`GET` on `/v2/<name>/blobs/uploads/<id>`
pub(crate) async fn continue_upload(
    proxy: &Proxy,
    name: RepoName,
    id: String,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let Some(cache) = proxy.cache.as_ref() else {
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    let method = req.method().clone();
    let owner = owner_of(proxy, &req, client);
    let session = cache
        .upload(&id, false)
        .filter(|s| may_answer(s, &owner, &req));
    let Some(session) = session else {
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    match method {
        Method::GET => match (session.offset(), session.claim(&proxy.config.clock)) {
            (Some(offset), Some(_claimed)) => Ok(status(&session, &id, offset)),
            _ => passthrough::forward(proxy, req, client, outcome).await,
        },
        Method::DELETE => {
            let resp = passthrough::forward(proxy, req, client, outcome).await?;
            if resp.status().is_success() {
                forget(cache, &id).await;
            }
            Ok(resp)
        }
        Method::PATCH | Method::PUT => {
            send_bytes(proxy, cache, &name, &id, &session, req, client, outcome).await
        }
        _ => passthrough::forward(proxy, req, client, outcome).await,
    }
}

/// A `PATCH` (a chunk) or `PUT` (the last chunk, or none, and the digest)
/// on a session graft knows and the client may use.
#[allow(clippy::too_many_arguments)]
async fn send_bytes(
    proxy: &Proxy,
    cache: &Arc<ContentCache>,
    name: &RepoName,
    id: &str,
    session: &Arc<Session>,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let (Some(offset), Some(_claimed)) = (session.offset(), session.claim(&proxy.config.clock))
    else {
        // Lost track (a request cut midway, or one in flight): step aside.
        forget(cache, id).await;
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    // "Pushing a blob in chunks": a chunk must start where the upload stands.
    if let Some(range) = req.headers().get(header::CONTENT_RANGE) {
        if content_range(range).is_none_or(|(start, _)| start != offset) {
            let mut resp = status(session, id, offset);
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            return Ok(resp);
        }
    }
    let is_put = req.method() == Method::PUT;
    let digest = Query::of(&req).digest;
    let req = with_latest_state(req, session);
    session.unsure();
    let (req, teed) = tee(req, session);
    let resp = match passthrough::forward(proxy, req, client, outcome).await {
        Ok(resp) => resp,
        Err(e) => {
            forget(cache, id).await;
            return Err(e);
        }
    };
    if is_put {
        cache.upload(id, true);
        return match digest {
            Some(digest) => complete(cache, name, &digest, session, teed, resp).await,
            None => {
                teed.end(false).await;
                session.discard().await;
                Ok(resp)
            }
        };
    }
    let now = offset + teed.seen();
    if resp.status() == StatusCode::ACCEPTED && agrees(&resp, now) {
        teed.end(true).await;
        session.answered(Some(now), resp.headers().get(header::LOCATION).cloned());
    } else {
        // Refused, or the upstream counts otherwise: its word stands, and
        // graft stops answering for this session.
        teed.end(false).await;
        forget(cache, id).await;
    }
    Ok(resp)
}

/// Who a request comes from, for the per-client cap and for answering a
/// session's requests only to the client that started it.
fn owner_of(proxy: &Proxy, req: &Request<Body>, client: &ClientSide) -> Owner {
    match req.headers().get(header::AUTHORIZATION) {
        Some(auth) => Owner::Credentials(proxy.access.key(Some(auth))),
        None => Owner::Anonymous(client.peer().ip()),
    }
}

/// Whether graft may answer for `session` to this request: the client that
/// started it, with a `_state` graft handed out for it (distribution signs
/// it; holding one is what the upstream asks of a client too). In front of
/// a registry that hands out none, the session's URL is all it asks for.
fn may_answer(session: &Session, owner: &Owner, req: &Request<Body>) -> bool {
    if session.owner() != owner {
        return false;
    }
    let state = query::pairs(req.uri().query().unwrap_or(""))
        .find(|(k, _)| *k == "_state")
        .map(|(_, v)| v.into_owned());
    match state {
        Some(s) => session.issued(&s),
        None => session.latest_state().is_none(),
    }
}

/// Points a request at the session's latest `_state`: its owner proved
/// itself with an earlier one graft handed out, and distribution takes
/// only the latest (it answers 404 to the rest).
fn with_latest_state(mut req: Request<Body>, session: &Session) -> Request<Body> {
    let (Some(latest), Some(raw)) = (session.latest_state(), req.uri().query()) else {
        return req;
    };
    let mut target = req.uri().path().to_string();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        if pair.split('=').next() == Some("_state") {
            query::append(&mut target, "_state", &latest);
        } else {
            target.push(if target.contains('?') { '&' } else { '?' });
            target.push_str(pair);
        }
    }
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = target.parse().ok();
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}

/// Forgets upload `id` (graft no longer answers for it) and its tee.
async fn forget(cache: &Arc<ContentCache>, id: &str) {
    if let Some(session) = cache.upload(id, true) {
        session.discard().await;
    }
}

/// The session's status as the spec words it: `Location`, `Range:
/// 0-<offset-1>` (`0-0` when empty, as distribution answers), the
/// upload's id; 204 (the caller turns it into a 416). No `Content-Length`
/// on a 204 (RFC 9110 §8.6).
fn status(session: &Session, id: &str, offset: u64) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    if let Some(loc) = session.location() {
        h.insert(header::LOCATION, loc);
    }
    let range = format!("0-{}", offset.saturating_sub(1));
    if let Ok(v) = HeaderValue::from_str(&range) {
        h.insert(header::RANGE, v);
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(UPLOAD_UUID, v);
    }
    resp
}

/// Whether the upstream's `Range` after a chunk says it holds `offset`
/// bytes (`0-0` stands for none or one; no header, nothing to contradict).
fn agrees(resp: &Response<Body>, offset: u64) -> bool {
    let Some(v) = resp.headers().get(header::RANGE) else {
        return true;
    };
    match content_range(v) {
        Some((0, 0)) => offset <= 1,
        Some((0, end)) => end + 1 == offset,
        _ => false,
    }
}

fn tee(req: Request<Body>, session: &Arc<Session>) -> (Request<Body>, Teed) {
    let (parts, b) = req.into_parts();
    let (tee, teed) = session.tee(b);
    (Request::from_parts(parts, body::boxed(tee)), teed)
}

/// The upstream answered the request that completes an upload as
/// `digest`: the blob is cached when it accepted it under that digest, and
/// the client is refused when it took it under another.
async fn complete(
    cache: &Arc<ContentCache>,
    name: &RepoName,
    digest: &Digest,
    session: &Session,
    teed: Teed,
    resp: Response<Body>,
) -> Result<Response<Body>, Error> {
    let accepted = resp.status() == StatusCode::CREATED;
    let stored = resp
        .headers()
        .get(CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let substituted = stored
        .as_deref()
        .filter(|s| accepted && *s != digest.as_str());
    teed.end(accepted && substituted.is_none()).await;
    if let Some(stored) = substituted {
        session.discard().await;
        tracing::warn!(asked = %digest, stored, "upstream stored a pushed blob under another digest");
        return Err(Error::DigestNotKept {
            asked: digest.to_string(),
            stored: stored.to_string(),
        });
    }
    if accepted {
        cache.mark_present(name, digest).await;
    }
    session.finish(cache, digest, accepted).await;
    Ok(resp)
}

/// The upload session id: the last path segment of `Location`.
fn upload_id(resp: &Response<Body>) -> Option<String> {
    let loc = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    let path = loc.split('?').next()?;
    let id = path.rsplit('/').next()?;
    (!id.is_empty()).then(|| id.to_string())
}

/// `<start>-<end>` of a `Content-Range` or an upload's `Range` (the spec's
/// form; a `bytes` prefix, as distribution's docs show, is accepted).
fn content_range(v: &HeaderValue) -> Option<(u64, u64)> {
    let v = v.to_str().ok()?.trim();
    let v = v
        .strip_prefix("bytes")
        .map_or(v, |r| r.trim_start_matches([' ', '=']));
    let (start, end) = v.split_once('-')?;
    let (start, end) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    (start <= end).then_some((start, end))
}

struct Query {
    digest: Option<Digest>,
    mount: bool,
}

impl Query {
    fn of(req: &Request<Body>) -> Query {
        let mut q = Query {
            digest: None,
            mount: false,
        };
        for (k, v) in query::pairs(req.uri().query().unwrap_or("")) {
            match k {
                "digest" => q.digest = v.parse().ok(),
                "mount" => q.mount = true,
                _ => {}
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_in_the_spec_s_form_and_distribution_s() {
        let parse = |s: &'static str| content_range(&HeaderValue::from_static(s));
        assert_eq!(parse("0-99"), Some((0, 99)));
        assert_eq!(parse("bytes=100-199"), Some((100, 199)));
        assert_eq!(parse("bytes 5-5"), Some((5, 5)));
        for bad in ["", "5", "9-5", "-5", "a-b", "0-1-2"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
