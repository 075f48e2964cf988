//! Blob uploads (distribution-spec "Pushing blobs": monolithic POST,
//! POST + PUT, chunked PATCHes): passed through, streaming, and teed into
//! the cache when graft sees every byte (see `cache::upload`).

use http::header;
use http::{Method, Request, Response, StatusCode};

use super::{passthrough, Outcome, Proxy};
use crate::body::{self, Body};
use std::sync::Arc;

use crate::cache::{ContentCache, Session, Tee};
use crate::error::Error;
use crate::oci::{query, Digest, RepoName};
use crate::upstream::ClientSide;

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
    let query = Query::of(&req);
    if query.mount {
        return passthrough::forward(proxy, req, client, outcome).await;
    }
    if let Some(digest) = query.digest {
        // Monolithic: the whole blob is this request's body.
        let session = cache.upload_session();
        let req = tee(req, &session);
        let resp = passthrough::forward(proxy, req, client, outcome).await?;
        finish(cache, &name, &digest, &session, resp.status()).await;
        return Ok(resp);
    }
    let resp = passthrough::forward(proxy, req, client, outcome).await?;
    if resp.status() == StatusCode::ACCEPTED {
        if let Some(id) = upload_id(&resp) {
            cache.begin_upload(&id);
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
    let session = match method {
        Method::PATCH => cache.upload(&id, false),
        Method::PUT | Method::DELETE => cache.upload(&id, true),
        _ => None,
    };
    let Some(session) = session else {
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    if method == Method::DELETE {
        session.give_up();
        return passthrough::forward(proxy, req, client, outcome).await;
    }
    // A chunk must continue exactly where the tee stands.
    if let Some(start) = range_start(&req) {
        if session.offset() != Some(start) {
            session.give_up();
        }
    }
    let digest = Query::of(&req).digest;
    let req = tee(req, &session);
    let resp = passthrough::forward(proxy, req, client, outcome).await?;
    match (method, digest) {
        (Method::PATCH, _) if resp.status() != StatusCode::ACCEPTED => session.give_up(),
        (Method::PUT, Some(digest)) => finish(cache, &name, &digest, &session, resp.status()).await,
        (Method::PUT, None) => session.give_up(),
        _ => {}
    }
    Ok(resp)
}

fn tee(req: Request<Body>, session: &Arc<Session>) -> Request<Body> {
    let session = session.clone();
    req.map(|b| body::boxed(Tee::new(b, session)))
}

/// The upstream answered the request that completes an upload.
async fn finish(
    cache: &Arc<ContentCache>,
    name: &RepoName,
    digest: &Digest,
    session: &Session,
    status: StatusCode,
) {
    let accepted = status == StatusCode::CREATED;
    if accepted {
        cache.mark_present(name, digest).await;
    }
    session.finish(cache, digest, accepted).await;
}

/// The upload session id: the last path segment of `Location`.
fn upload_id(resp: &Response<Body>) -> Option<String> {
    let loc = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    let path = loc.split('?').next()?;
    let id = path.rsplit('/').next()?;
    (!id.is_empty()).then(|| id.to_string())
}

/// `Content-Range: <start>-<end>` of a chunk (the spec's form, no `bytes`).
fn range_start(req: &Request<Body>) -> Option<u64> {
    let v = req.headers().get(header::CONTENT_RANGE)?.to_str().ok()?;
    let v = v
        .trim()
        .trim_start_matches("bytes")
        .trim_start_matches([' ', '=']);
    v.split('-').next()?.trim().parse().ok()
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
