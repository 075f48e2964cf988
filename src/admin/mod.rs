//! Operator commands that run beside the proxy rather than inside it:
//! [`reindex`] (`graft reindex`) rebuilds the referrers index from the
//! upstream's fallback tags, [`listing`] (`graft referrers`) shows what
//! a running graft's referrers API answers, as a list or a tree,
//! [`cache`] (`graft cache stats|gc|verify`) inspects and maintains the
//! content cache of a stopped graft's data directory, and [`warm`]
//! (`graft cache warm`) pre-pulls images through a running graft;
//! [`migrate`] (`graft migrate`) re-pushes fallback-tag referrers to a
//! registry that gained the referrers API, so its own index is complete;
//! [`doctor`] (`graft doctor`) checks a registry before graft fronts it.
//!
//! `reindex` and `listing` walk paginated registry answers (catalog, tags,
//! referrers); [`Pages`] is the one way they follow `Link: <…>; rel="next"`. The commands
//! report progress through [`Progress`]; drawing it is the binary's business.

pub mod cache;
pub mod doctor;
pub mod listing;
pub mod migrate;
mod progress;
pub mod reindex;
pub mod warm;

pub use progress::{Outcome, Progress, Silent, Unit};

use http::header::{self, HeaderMap};

/// A walk along a `Link: <…>; rel="next"` chain:
///
/// ```ignore
/// let mut pages = Pages::new(first, MAX_PAGES);
/// while let Some(path) = pages.next_path()? {
///     let resp = get(&path).await?;
///     pages.followed(resp.headers(), origin);
///     // … read the page …
/// }
/// ```
///
/// It ends when a page has no next link or links to itself, and fails past
/// `max` pages: a chain that long is taken for a loop.
#[derive(Debug)]
pub(crate) struct Pages {
    first: String,
    next: Option<String>,
    current: String,
    fetched: usize,
    max: usize,
}

/// A `Link` chain longer than the walk allows.
#[derive(Debug, thiserror::Error)]
#[error("{first}: more than {max} pages; the Link chain looks like a loop")]
pub(crate) struct TooManyPages {
    first: String,
    max: usize,
}

impl Pages {
    pub(crate) fn new(first: String, max: usize) -> Pages {
        Pages {
            next: Some(first.clone()),
            first,
            current: String::new(),
            fetched: 0,
            max,
        }
    }

    /// The path of the page to fetch next, `None` at the end of the chain.
    pub(crate) fn next_path(&mut self) -> Result<Option<String>, TooManyPages> {
        let Some(path) = self.next.take() else {
            return Ok(None);
        };
        self.fetched += 1;
        if self.fetched > self.max {
            return Err(TooManyPages {
                first: self.first.clone(),
                max: self.max,
            });
        }
        self.current.clone_from(&path);
        Ok(Some(path))
    }

    /// Takes the next link from the headers of the page just fetched (see
    /// [`next_link`] for which links are followed).
    pub(crate) fn followed(&mut self, headers: &HeaderMap, origin: &str) {
        self.next = next_link(headers, origin).filter(|n| *n != self.current);
    }
}

/// The path and query of the `rel="next"` link in `headers`, if any.
///
/// Relative links are used as they are. An absolute link is followed only
/// when it points at `origin`: the request carries credentials, and a link
/// must not be able to send them to another host.
pub fn next_link(headers: &HeaderMap, origin: &str) -> Option<String> {
    for value in headers.get_all(header::LINK) {
        let Ok(value) = value.to_str() else { continue };
        for link in value.split(',') {
            let Some((target, params)) = link.trim().split_once('>') else {
                continue;
            };
            let Some(url) = target.trim().strip_prefix('<') else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            });
            if !is_next {
                continue;
            }
            if url.starts_with('/') {
                return Some(url.to_string());
            }
            let n = origin.len();
            if url.len() > n && url.as_bytes()[..n].eq_ignore_ascii_case(origin.as_bytes()) {
                let rest = &url[n..];
                if rest.starts_with('/') {
                    return Some(rest.to_string());
                }
            }
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn pages_end_without_a_next_link_or_at_a_self_link_and_stop_loops() {
        let o = "http://127.0.0.1:5000";
        let mut pages = Pages::new("/v2/_catalog".into(), 3);
        assert_eq!(
            pages.next_path().expect("1").as_deref(),
            Some("/v2/_catalog")
        );
        pages.followed(&link("</v2/_catalog?last=a>; rel=\"next\""), o);
        assert_eq!(
            pages.next_path().expect("2").as_deref(),
            Some("/v2/_catalog?last=a")
        );
        pages.followed(&link("</v2/_catalog?last=a>; rel=\"next\""), o);
        assert_eq!(pages.next_path().expect("a self link ends it"), None);

        let mut pages = Pages::new("/p0".into(), 3);
        assert!(pages.next_path().expect("first").is_some());
        pages.followed(&HeaderMap::new(), o);
        assert_eq!(pages.next_path().expect("no link ends it"), None);

        let mut pages = Pages::new("/p0".into(), 2);
        for next in ["</p1>; rel=next", "</p0>; rel=next"] {
            assert!(pages.next_path().expect("within max").is_some());
            pages.followed(&link(next), o);
        }
        let e = pages.next_path().expect_err("a loop");
        assert!(e.to_string().contains("more than 2 pages"), "{e}");
    }

    fn link(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::LINK, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn next_links_are_relative_or_on_the_same_origin() {
        let o = "http://127.0.0.1:5000";
        assert_eq!(
            next_link(&link("</v2/_catalog?last=b&n=100>; rel=\"next\""), o).as_deref(),
            Some("/v2/_catalog?last=b&n=100")
        );
        assert_eq!(
            next_link(
                &link("<http://127.0.0.1:5000/v2/a/tags/list?last=x>; rel=next"),
                o
            )
            .as_deref(),
            Some("/v2/a/tags/list?last=x")
        );
        assert_eq!(
            next_link(
                &link("<http://elsewhere.example/v2/_catalog>; rel=\"next\""),
                o
            ),
            None
        );
        assert_eq!(
            next_link(
                &link("<http://127.0.0.1:50001/v2/_catalog>; rel=\"next\""),
                o
            ),
            None
        );
        assert_eq!(
            next_link(
                &link("</v2/x?p=1>; rel=\"prev\", </v2/x?p=3>; rel=\"next\""),
                o
            )
            .as_deref(),
            Some("/v2/x?p=3")
        );
        assert_eq!(next_link(&HeaderMap::new(), o), None);
    }
}
