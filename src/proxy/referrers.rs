//! `GET /v2/<name>/referrers/<digest>` (distribution-spec, "Listing
//! Referrers"): always 200 with an image index, never 404 for an unknown
//! subject; `artifactType` filtering with `OCI-Filters-Applied`; pagination
//! with `Link: <…>; rel="next"`.

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::{head_only, passthrough, Outcome, Proxy};
use crate::body::{self, Body};
use crate::error::{oci_error, Error};
use crate::oci::{media, query, Digest, ErrorCode, ImageIndex, RepoName};
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
    let referrers = &proxy.referrers;
    match referrers.upstream_is_native() {
        Some(true) => return passthrough::forward(proxy, req, client, outcome).await,
        Some(false) => {}
        None => {
            // Mode `auto`, not yet known: ask the upstream once.
            let probe = passthrough::forward(proxy, head_only(&req), client, outcome).await?;
            let is_index = probe
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(media::IMAGE_INDEX.as_bytes()));
            match probe.status() {
                StatusCode::OK if is_index => {
                    referrers.learn_native(true);
                    return Ok(probe);
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Ok(probe),
                s if s.is_server_error() => return Ok(probe),
                _ => referrers.learn_native(false),
            }
        }
    }

    let query = Query::parse(req.uri().query().unwrap_or(""));
    let auth = req.headers().get(header::AUTHORIZATION);
    let all = match referrers.list(&name, &subject, auth).await? {
        Access::Denied(d) => return Ok(denied(d)),
        Access::Granted(list) => list,
    };
    let filtered: Vec<_> = all
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
    let page_size = referrers.config().page_size;
    let more = filtered.len() > page_size;
    let page: Vec<_> = filtered.into_iter().take(page_size).collect();

    let mut resp = Response::new(if req.method() == Method::HEAD {
        body::empty()
    } else {
        body::full(ImageIndex::of(page.clone()).to_bytes())
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
    if more {
        if let Some(last) = page.last() {
            let mut next = format!("/v2/{name}/referrers/{subject}");
            query::append(&mut next, "last", last.digest.as_str());
            for t in &query.artifact_types {
                query::append(&mut next, "artifactType", t);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")) {
                headers.insert(header::LINK, v);
            }
        }
    }
    Ok(resp)
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
