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
use crate::config::ReferrersMode;
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
    if let Some(upstream_answer) =
        native_answer(proxy, (&name, &subject), head_only(&req), client, outcome).await?
    {
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
/// `passthrough`), the union of it and what graft knows (mode `auto` once
/// learnt), or the answer to the one-time probe of mode `auto` when it is a
/// no or an outage that the client should see as is. `head` is the
/// client's GET or HEAD without its (empty) body. `None`: graft answers
/// from its index.
async fn native_answer(
    proxy: &Proxy,
    target: (&RepoName, &Digest),
    head: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Option<Response<Body>>, Error> {
    let referrers = &proxy.referrers;
    match referrers.upstream_is_native() {
        Some(true) if referrers.config().mode != ReferrersMode::Auto => {
            return passthrough::forward(proxy, head, client, outcome)
                .await
                .map(Some)
        }
        Some(false) => return Ok(None),
        _ => {}
    }
    // The client's own request first: its credentials decide, and a no
    // (401, 403, 404) goes back to it unchanged.
    let (method, uri, auth) = (
        head.method().clone(),
        head.uri().clone(),
        head.headers().get(header::AUTHORIZATION).cloned(),
    );
    let known_native = referrers.upstream_is_native() == Some(true);
    let up_req = proxy.upstream.forward_request(head, client)?;
    let (first, took) = match proxy.upstream.send(up_req).await {
        Ok(sent) => sent,
        Err(e) if known_native && e.is_outage() => {
            let query = Query::parse(uri.query().unwrap_or(""));
            return match offline_answer(proxy, target, &query, &method, auth.as_ref()).await? {
                Some(resp) => Ok(Some(resp)),
                None => Err(e.into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    outcome.upstream = Some(took);
    let is_index = first
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(media::IMAGE_INDEX.as_bytes()));
    if known_native && crate::access::is_outage(first.status()) {
        let query = Query::parse(uri.query().unwrap_or(""));
        if let Some(resp) = offline_answer(proxy, target, &query, &method, auth.as_ref()).await? {
            return Ok(Some(resp));
        }
    }
    if crate::upstream::is_denial(first.status()) {
        // A no always stands and forgets a remembered yes.
        proxy
            .access
            .forget(target.0, proxy.access.key(auth.as_ref()));
    }
    match first.status() {
        StatusCode::OK if is_index => {
            referrers.learn_native(true);
            proxy.access.remember_yes(target.0, auth.as_ref());
            let asked = Asked {
                method,
                uri,
                auth,
                client,
            };
            union_answer(proxy, target, asked, first).await.map(Some)
        }
        _ if referrers.upstream_is_native() == Some(true) => {
            passthrough::relay(proxy, first, client).map(Some)
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            passthrough::relay(proxy, first, client).map(Some)
        }
        s if s.is_server_error() => passthrough::relay(proxy, first, client).map(Some),
        _ => {
            referrers.learn_native(false);
            Ok(None)
        }
    }
}

/// The client's referrers request, as the union needs it.
struct Asked<'a> {
    method: Method,
    uri: http::Uri,
    auth: Option<HeaderValue>,
    client: &'a ClientSide,
}

/// The union of the upstream's list and the referrers graft knows that it
/// lacks (`referrers::Union`). When graft adds nothing, the client gets the
/// upstream's own answer, byte for byte; otherwise graft's answer, filtered
/// and paged by graft, marked `Graft-Referrers-Source: union`.
async fn union_answer(
    proxy: &Proxy,
    (name, subject): (&RepoName, &Digest),
    asked: Asked<'_>,
    first: Response<hyper::body::Incoming>,
) -> Result<Response<Body>, Error> {
    let referrers = &proxy.referrers;
    let raw_query = asked.uri.query().unwrap_or("");
    let query = Query::parse(raw_query);
    // A page after the first (the upstream's cursor or graft's own): the
    // whole list is walked again from the start to find what it lacks.
    let continued = query::pairs(raw_query).any(|(k, _)| k != "artifactType");
    let with_body = asked.method == Method::GET;
    let (mut parts, incoming) = first.into_parts();
    let first_body = if with_body {
        proxy
            .upstream
            .read_limited(incoming, UNION_FIRST_PAGE_LIMIT)
            .await?
    } else {
        drop(incoming);
        bytes::Bytes::new()
    };
    let auth = asked.auth.as_ref();
    let first_page = (with_body && !continued).then_some((&first_body[..], &parts.headers));
    let upstream_list = referrers
        .native_list(name, subject, &query.artifact_types, first_page, auth)
        .await?;
    let union = referrers
        .union(name, subject, upstream_list, &query.artifact_types, auth)
        .await?;
    if with_body && !continued {
        keep_for_offline(proxy, (name, subject), &query, &union.entries).await;
    }
    if union.added == 0 {
        proxy
            .upstream
            .rewrite_response_headers(&mut parts.headers, asked.client)?;
        return Ok(Response::from_parts(parts, body::full(first_body)));
    }
    let page = Page::of(union.entries, &query, referrers.config().page_size);
    let mut resp = page.into_response(name, subject, &query, with_body);
    resp.headers_mut()
        .insert(SOURCE, HeaderValue::from_static(FROM_UNION));
    Ok(resp)
}

/// Keeps the answer (all pages, filtered) as the one to give while the
/// upstream is unreachable: best effort, a lost one only costs offline
/// cover.
async fn keep_for_offline(
    proxy: &Proxy,
    (name, subject): (&RepoName, &Digest),
    query: &Query,
    entries: &[Descriptor],
) {
    let kept: Vec<Descriptor> = entries
        .iter()
        .filter(|d| query.matches(d))
        .cloned()
        .collect();
    let body = ImageIndex::of(kept).to_bytes();
    let (r, s, f) = (name.clone(), subject.clone(), query.filter_key());
    let stored = proxy
        .referrers
        .index()
        .blocking(move |ix| {
            ix.native_answers().set(&r, &s, &f, &body);
            Ok(())
        })
        .await;
    if let Err(e) = stored {
        tracing::warn!(repo = %name, %subject, error = %e, "cannot keep the referrers answer for offline use");
    }
}

/// The answer kept by [`keep_for_offline`], for a client whose access to
/// the repository graft remembers (the rule of cached pulls), while the
/// native upstream cannot answer: at most `referrers.max_stale` old.
/// `None`: no such answer, or not for this client.
async fn offline_answer(
    proxy: &Proxy,
    (name, subject): (&RepoName, &Digest),
    query: &Query,
    method: &Method,
    auth: Option<&HeaderValue>,
) -> Result<Option<Response<Body>>, Error> {
    if !proxy.access.stale_yes(name, auth).await {
        return Ok(None);
    }
    let index = proxy.referrers.index();
    let (r, s, f) = (name.clone(), subject.clone(), query.filter_key());
    let Some(kept) = index
        .blocking(move |ix| ix.native_answers().get(&r, &s, &f))
        .await?
    else {
        return Ok(None);
    };
    let age = index.clock().now_secs().saturating_sub(kept.stored);
    if age > proxy.referrers.config().max_stale.as_secs() {
        return Ok(None);
    }
    let Ok(ix) = serde_json::from_slice::<ImageIndex>(&kept.body) else {
        return Ok(None);
    };
    tracing::warn!(repo = %name, %subject, age_secs = age, "upstream unavailable; referrers answered from the last native answer");
    let page = Page::of(ix.manifests, query, proxy.referrers.config().page_size);
    let mut resp = page.into_response(name, subject, query, *method != Method::HEAD);
    resp.headers_mut()
        .insert(SOURCE, HeaderValue::from_static(FROM_INDEX));
    Ok(Some(resp))
}

/// The first page of the upstream's answer is read whole to learn its
/// entries; the same bound as the whole walk.
const UNION_FIRST_PAGE_LIMIT: usize = 8 * 1024 * 1024;

/// Marks an answer in which graft added referrers the upstream's own
/// referrers API lacks (pushed before it gained the API).
const FROM_UNION: &str = "union";

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
            .filter(|d| query.matches(d))
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
    /// Whether `d` passes the `artifactType` filter.
    fn matches(&self, d: &Descriptor) -> bool {
        self.artifact_types.is_empty()
            || d.artifact_type
                .as_ref()
                .is_some_and(|t| self.artifact_types.contains(t))
    }

    /// The filter as a key: the types sorted, so their order does not matter.
    fn filter_key(&self) -> String {
        let mut t = self.artifact_types.clone();
        t.sort();
        t.dedup();
        t.join("\n")
    }

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
