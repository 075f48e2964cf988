//! Operator commands that run beside the proxy rather than inside it:
//! [`reindex`] (`graft reindex`) rebuilds the referrers index from the
//! upstream's fallback tags, [`listing`] (`graft referrers`) shows what
//! a running graft's referrers API answers, as a list or a tree,
//! [`cache`] (`graft cache stats|gc|verify`) inspects and maintains the
//! content cache of a stopped graft's data directory, and [`warm`]
//! (`graft cache warm`) pre-pulls images through a running graft.
//!
//! `reindex` and `listing` walk paginated registry answers; [`next_link`]
//! is the one reading of `Link: <…>; rel="next"` they share. The commands
//! report progress through [`Progress`]; drawing it is the binary's business.

pub mod cache;
pub mod listing;
mod progress;
pub mod reindex;
pub mod warm;

pub use progress::{Outcome, Progress, Silent, Unit};

use http::header::{self, HeaderMap};

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
