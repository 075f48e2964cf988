//! `GET /v2/<name>/tags/list?n=<int>&last=<tag>` (distribution-spec
//! "Listing Tags", end-8b), answered by graft itself.
//!
//! distribution 2.x pages tag lists in storage order and gets `n` and
//! `last` wrong, and the fallback tags graft writes make every repository
//! with referrers one that clients page through. So a listing that asks for
//! a page is cut by graft from the upstream's whole listing: read with the
//! client's own credentials (an upstream refusal is passed on unchanged),
//! following the upstream's own `Link` pages, bounded in bytes and pages.
//! A listing without `n` or `last`, or with values the spec does not define
//! (an `n` that is not a non-negative integer, a `last` that is not a tag),
//! is forwarded untouched: the upstream's answer stands.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::{passthrough, Outcome, Proxy};
use crate::body::{self, Body};
use crate::error::Error;
use crate::oci::{query, Reference, RepoName};
use crate::upstream::ClientSide;

/// The most bytes of upstream listing read for one request (~200 000 tags
/// of average length): the whole list is held in memory to sort it.
const MAX_LISTING_BYTES: usize = 16 * 1024 * 1024;
/// The most upstream pages followed for one request (a `Link` loop ends).
const MAX_PAGES: usize = 1_000;

/// The page a client asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Page {
    /// At most this many tags (`n`); `None`: all that follow `last`.
    n: Option<usize>,
    /// Start after this tag.
    last: Option<String>,
}

impl Page {
    /// The page a query asks for; `None` when it asks for none (no `n`, no
    /// `last`) or for one the spec does not define.
    pub(crate) fn of(query: Option<&str>) -> Option<Page> {
        let mut page = Page {
            n: None,
            last: None,
        };
        let mut asked = false;
        for (key, value) in query::pairs(query.unwrap_or_default()) {
            match key {
                "n" => {
                    asked = true;
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    // Past usize the count is "all of them" anyway.
                    page.n = Some(value.parse().unwrap_or(usize::MAX));
                }
                "last" => {
                    asked = true;
                    if !Reference::is_tag(&value) {
                        return None;
                    }
                    page.last = Some(value.into_owned());
                }
                _ => {}
            }
        }
        asked.then_some(page)
    }

    /// This page of the sorted, deduplicated `tags`, and whether more follow.
    fn cut<'a>(&self, tags: &'a [String]) -> (&'a [String], bool) {
        let start = match &self.last {
            Some(last) => tags.partition_point(|t| t.as_str() <= last.as_str()),
            None => 0,
        };
        let rest = &tags[start..];
        let n = self.n.unwrap_or(usize::MAX).min(rest.len());
        // `n = 0` is an empty list without `Link` (the spec's MUST NOT).
        let more = self.n != Some(0) && n < rest.len();
        (&rest[..n], more)
    }
}

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Answer<'a> {
    name: &'a str,
    tags: &'a [String],
}

/// A tag listing: a page of it answered here, anything else forwarded.
pub(crate) async fn handle(
    proxy: &Proxy,
    name: RepoName,
    req: Request<Body>,
    client: &ClientSide,
    outcome: &mut Outcome,
) -> Result<Response<Body>, Error> {
    let page = (req.method() == Method::GET)
        .then(|| Page::of(req.uri().query()))
        .flatten();
    let Some(page) = page else {
        return passthrough::forward(proxy, req, client, outcome).await;
    };
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let started = std::time::Instant::now();
    let listing = all_tags(proxy, &name, auth.as_ref()).await;
    outcome.upstream = Some(started.elapsed());
    let tags = match listing? {
        Ok(tags) => tags,
        Err(refusal) => return passthrough::relay(proxy, refusal, client),
    };
    let (tags, more) = page.cut(&tags);
    let json = serde_json::to_vec(&Answer {
        name: name.as_str(),
        tags,
    })
    .map_err(|e| Error::Internal(format!("tag list JSON: {e}")))?;
    let mut resp = Response::new(body::full(Bytes::from(json)));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let (true, Some(last)) = (more, tags.last()) {
        let link = next_link(&name, page.n, last);
        let value = HeaderValue::from_str(&link)
            .map_err(|e| Error::Internal(format!("Link header `{link}`: {e}")))?;
        headers.insert(header::LINK, value);
    }
    Ok(resp)
}

/// `</v2/<name>/tags/list?n=<n>&last=<last>>; rel="next"`.
fn next_link(name: &RepoName, n: Option<usize>, last: &str) -> String {
    let mut target = format!("/v2/{name}/tags/list");
    if let Some(n) = n {
        query::append(&mut target, "n", &n.to_string());
    }
    query::append(&mut target, "last", last);
    format!("<{target}>; rel=\"next\"")
}

/// Every tag of `name`, sorted and deduplicated, read page by page with the
/// client's credentials; `Ok(Err(resp))` is the upstream's refusal.
async fn all_tags(
    proxy: &Proxy,
    name: &RepoName,
    auth: Option<&HeaderValue>,
) -> Result<Result<Vec<String>, Response<Incoming>>, Error> {
    let mut tags = Vec::new();
    let mut budget = MAX_LISTING_BYTES;
    let mut path = format!("/v2/{name}/tags/list");
    let accept = [(header::ACCEPT, "application/json")];
    for _ in 0..MAX_PAGES {
        let resp = proxy
            .upstream
            .call(Method::GET, &path, auth, &accept, Bytes::new())
            .await?;
        if resp.status() != StatusCode::OK {
            return Ok(Err(resp));
        }
        let next = next_page(proxy, resp.headers())?;
        let bytes = proxy
            .upstream
            .read_limited(resp.into_body(), budget)
            .await?;
        budget -= bytes.len();
        let listing: Listing = serde_json::from_slice(&bytes)
            .map_err(|e| Error::UpstreamInvalid(format!("tag listing of {name}: {e}")))?;
        tags.extend(listing.tags.unwrap_or_default());
        match next {
            Some(next) => path = next,
            None => {
                tags.sort_unstable();
                tags.dedup();
                return Ok(Ok(tags));
            }
        }
    }
    Err(Error::UpstreamInvalid(format!(
        "tag listing of {name}: more than {MAX_PAGES} pages"
    )))
}

/// The path of the upstream's `rel="next"` page, if it names one. A page
/// on another host is not followed: the client's credentials stay home.
fn next_page(proxy: &Proxy, headers: &http::HeaderMap) -> Result<Option<String>, Error> {
    let Some(target) = headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(next_target)
    else {
        return Ok(None);
    };
    if target.starts_with('/') {
        return Ok(Some(target.to_string()));
    }
    if proxy.upstream.is_own_url(target) {
        // `scheme://authority/path?query` → `/path?query`.
        let path = target.splitn(4, '/').nth(3).unwrap_or_default();
        return Ok(Some(format!("/{path}")));
    }
    Err(Error::UpstreamInvalid(format!(
        "tag listing page on another host: {target}"
    )))
}

/// The target of one `Link` value when its relation is `next`.
fn next_target(link: &str) -> Option<&str> {
    let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
    let next = params.split(';').any(|p| {
        let p = p.trim().replace(' ', "");
        p == "rel=\"next\"" || p == "rel=next"
    });
    next.then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn a_page_is_asked_for_by_n_or_last_with_values_the_spec_defines() {
        assert_eq!(Page::of(None), None);
        assert_eq!(Page::of(Some("ns=x")), None);
        assert_eq!(
            Page::of(Some("n=2&last=v1")),
            Some(Page {
                n: Some(2),
                last: Some("v1".into())
            })
        );
        assert_eq!(
            Page::of(Some("last=v1")),
            Some(Page {
                n: None,
                last: Some("v1".into())
            })
        );
        for odd in ["n=", "n=-1", "n=a", "n=1.5", "last=.x", "n=2&last=a%2Fb"] {
            assert_eq!(Page::of(Some(odd)), None, "{odd}");
        }
        let huge = Page::of(Some("n=99999999999999999999999")).expect("a page");
        assert_eq!(huge.n, Some(usize::MAX));
    }

    #[test]
    fn pages_follow_the_spec_s_example() {
        let all = tags(&["v1", "v2", "v3", "v4"]);
        let page = |q: &str| Page::of(Some(q)).expect("a page");
        assert_eq!(page("n=2").cut(&all), (&all[..2], true));
        assert_eq!(page("n=2&last=v2").cut(&all), (&all[2..], false));
        assert_eq!(page("n=0").cut(&all), (&all[..0], false));
        assert_eq!(page("last=v1").cut(&all), (&all[1..], false));
        assert_eq!(page("last=v0").cut(&all), (&all[..], false));
        assert_eq!(page("n=9&last=v4").cut(&all), (&all[..0], false));
        assert_eq!(page("n=4").cut(&all), (&all[..], false));
    }

    #[test]
    fn links_name_n_and_last() {
        let name = RepoName::parse("a/b").expect("name");
        assert_eq!(
            next_link(&name, Some(7), "v1.0_x-y"),
            "</v2/a/b/tags/list?n=7&last=v1.0_x-y>; rel=\"next\""
        );
        assert_eq!(
            next_target("</v2/a/tags/list?last=b&n=100>; rel=\"next\""),
            Some("/v2/a/tags/list?last=b&n=100")
        );
        assert_eq!(next_target("<http://x/y>; rel=\"prev\""), None);
    }
}
