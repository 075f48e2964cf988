//! `GET /v2/<name>/referrers/<digest>` (distribution-spec, "Listing
//! Referrers"): always 200 with an image index, never 404 for an unknown
//! subject; `artifactType` filtering with `OCI-Filters-Applied`; pagination
//! with `Link: <…>; rel="next"`.
//!
//! When the upstream cannot answer the fallback-tag check right now (a
//! 5xx, a 429, a timeout, no connection), a client whose access to the
//! repository graft already knows (a yes within `cache.max_stale`, the rule
//! cached pulls follow) is answered from the index, marked by
//! `Graft-Referrers-Source: index; upstream-unavailable`; any other client
//! gets the upstream's trouble (429 with its `Retry-After`, else 502/504).

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::{head_only, passthrough, Outcome, Proxy};
use crate::body::{self, Body};
use crate::error::{oci_error, Error};
use crate::oci::{media, query, Descriptor, Digest, ErrorCode, ImageIndex, RepoName};
use crate::referrers::{Access, Denial};
use crate::upstream::ClientSide;

pub(crate) async fn handle(
    proxy: &Proxy,
    name: RepoName,
    subject: Digest,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return passthrough::forward(proxy, req, client, outcome).await;
    }
    if let Some(upstream_answer) = native_answer(proxy, head_only(&req), client, outcome).await? {
        return Ok(upstream_answer);
    }
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let auth = req.headers().get(header::AUTHORIZATION);
    let cred = proxy.access.key(auth);
    let (all, from_index) = match proxy.referrers.list(&name, &subject, auth).await {
        Ok(Access::Denied(d)) => {
            // A no always stands and forgets a remembered yes.
            proxy.access.forget(&name, cred);
            return Ok(denied(d));
        }
        Ok(Access::Granted(list)) => (list, false),
        Err(e) if e.is_upstream_outage() && proxy.access.stale_yes(&name, auth).await => {
            tracing::warn!(repo = %name, %subject, error = %e, "fallback tag unreadable; referrers answered from the index");
            (proxy.referrers.list_indexed(&name, &subject).await?, true)
        }
        Err(e) => return Err(e),
    };
    let page_size = proxy.referrers.config().page_size;
    let page = Page::of(all, &query, page_size);
    let with_body = req.method() != Method::HEAD;
    let mut resp = page.into_response(&name, &subject, &query, with_body);
    if from_index {
        resp.headers_mut()
            .insert(SOURCE, HeaderValue::from_static(FROM_INDEX));
    }
    Ok(resp)
}

/// Marks an answer graft gave from its index alone: the upstream's fallback
/// tag could not be read, so referrers only the tag lists may be missing.
const SOURCE: header::HeaderName = header::HeaderName::from_static("graft-referrers-source");
const FROM_INDEX: &str = "index; upstream-unavailable";

/// The upstream's own answer when it serves the referrers API (mode
/// `passthrough`, or `auto` once learnt), or when the one-time probe of
/// mode `auto` got a no or an outage that the client should see as is.
/// `head` is the client's GET or HEAD without its (empty) body. `None`:
/// graft answers from its index.
async fn native_answer(
    proxy: &Proxy,
    head: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Option<Response<Body>>, Error> {
    let referrers = &proxy.referrers;
    match referrers.upstream_is_native() {
        Some(true) => {
            return passthrough::forward(proxy, head, client, outcome)
                .await
                .map(Some)
        }
        Some(false) => return Ok(None),
        None => {}
    }
    // Mode `auto`, not yet known: ask the upstream once.
    let probe = passthrough::forward(proxy, head, client, outcome).await?;
    let is_index = probe
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(media::IMAGE_INDEX.as_bytes()));
    match probe.status() {
        StatusCode::OK if is_index => {
            referrers.learn_native(true);
            Ok(Some(probe))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Ok(Some(probe)),
        s if s.is_server_error() => Ok(Some(probe)),
        _ => {
            referrers.learn_native(false);
            Ok(None)
        }
    }
}

/// One page of a subject's referrers, after `artifactType` filtering and
/// the `last` cursor.
struct Page {
    entries: Vec<Descriptor>,
    /// Entries follow this page.
    more: bool,
}

impl Page {
    fn of(all: Vec<Descriptor>, query: &Query, page_size: usize) -> Page {
        let mut filtered: Vec<_> = all
            .into_iter()
            .filter(|d| {
                query.artifact_types.is_empty()
                    || d.artifact_type
                        .as_ref()
                        .is_some_and(|t| query.artifact_types.contains(t))
            })
            .filter(|d| {
                query
                    .last
                    .as_ref()
                    .is_none_or(|l| d.digest.as_str() > l.as_str())
            })
            .collect();
        let more = filtered.len() > page_size;
        filtered.truncate(page_size);
        Page {
            entries: filtered,
            more,
        }
    }

    /// The 200 image index, with `OCI-Filters-Applied` when filtered and a
    /// `Link` to the next page when there is one.
    fn into_response(
        self,
        name: &RepoName,
        subject: &Digest,
        query: &Query,
        with_body: bool,
    ) -> Response<Body> {
        let next = self.entries.last().filter(|_| self.more).map(|last| {
            let mut next = format!("/v2/{name}/referrers/{subject}");
            query::append(&mut next, "last", last.digest.as_str());
            for t in &query.artifact_types {
                query::append(&mut next, "artifactType", t);
            }
            next
        });
        let mut resp = Response::new(if with_body {
            body::full(ImageIndex::of(self.entries).to_bytes())
        } else {
            body::empty()
        });
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(media::IMAGE_INDEX),
        );
        if !query.artifact_types.is_empty() {
            headers.insert(
                "oci-filters-applied",
                HeaderValue::from_static("artifactType"),
            );
        }
        if let Some(v) =
            next.and_then(|n| HeaderValue::from_str(&format!("<{n}>; rel=\"next\"")).ok())
        {
            headers.insert(header::LINK, v);
        }
        resp
    }
}

/// The upstream's 401/403, with its challenge, and nothing from the index.
fn denied(d: Denial) -> Response<Body> {
    let code = if d.status == StatusCode::FORBIDDEN {
        ErrorCode::Denied
    } else {
        ErrorCode::Unauthorized
    };
    let mut resp = oci_error(
        d.status,
        code,
        "the upstream registry refused access to this repository",
        serde_json::Value::Null,
    );
    if let Some(c) = d.www_authenticate {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, c);
    }
    resp
}

struct Query {
    /// Repeated `artifactType` values are ORed.
    artifact_types: Vec<String>,
    /// Pagination cursor: entries after this digest.
    last: Option<String>,
}

impl Query {
    fn parse(q: &str) -> Query {
        let mut artifact_types = Vec::new();
        let mut last = None;
        for (k, v) in query::pairs(q) {
            match k {
                "artifactType" if !v.is_empty() => artifact_types.push(v.into_owned()),
                "last" => last = Some(v.into_owned()),
                _ => {}
            }
        }
        Query {
            artifact_types,
            last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keeps_plus_and_repeats() {
        let q = Query::parse("artifactType=application%2Fvnd.a%2Bjson&artifactType=application/vnd.b+json&last=sha256:ab");
        assert_eq!(
            q.artifact_types,
            vec!["application/vnd.a+json", "application/vnd.b+json"]
        );
        assert_eq!(q.last.as_deref(), Some("sha256:ab"));
    }
}
