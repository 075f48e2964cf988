//! Cached content as HTTP: the response headers a registry sends with a
//! blob or manifest (distribution-spec "Pulling blobs", "Pulling
//! manifests"), and single byte ranges on hits (RFC 9110 §14).

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use super::Proxy;
use crate::access::Kind;
use crate::body::{self, Body};
use crate::cache::{ContentCache, Hit};
use crate::error::oci_error;
use crate::metrics;
use crate::oci::{Digest, ErrorCode};

/// Serves a committed file: the whole of it, or one `Range`.
pub(super) fn serve_hit(
    proxy: &Proxy,
    cache: &ContentCache,
    kind: Kind,
    digest: &Digest,
    hit: Hit,
    want: &Want,
) -> Response<Body> {
    metrics::inc(&proxy.metrics.cache_hits);
    cache.touch(digest);
    let head = want.head;
    let len = hit.len();
    let media_type = hit.media_type().map(str::to_string);
    let range = want.range.as_deref().map(|r| parse_range(r, len));
    let (start, end, partial) = match range {
        None | Some(RangeAnswer::Ignore) => (0, len, false),
        Some(RangeAnswer::Unsatisfiable) => {
            let mut resp = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::BlobUnknown,
                "requested range not satisfiable",
                serde_json::Value::Null,
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
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
        body::boxed(hit.body(start, end))
    };
    let mut resp = content_response(kind, digest, media_type.as_deref(), Some(end - start), body);
    if partial {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

pub(super) fn content_response(
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

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeAnswer {
    Range(u64, u64),
    Unsatisfiable,
    /// Not a single byte range graft serves (multiple ranges, other units):
    /// answer with the whole content, as RFC 9110 §14.2 allows.
    Ignore,
}

/// Parses a single `bytes=` range against a length; the range is `[a, b)`.
pub(crate) fn parse_range(value: &str, len: u64) -> RangeAnswer {
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
            (Some(s), Some(e)) if s <= e && s < len => {
                RangeAnswer::Range(s, e.saturating_add(1).min(len))
            }
            (Some(_), Some(_)) => RangeAnswer::Unsatisfiable,
            _ => RangeAnswer::Ignore,
        },
        (true, true) => RangeAnswer::Ignore,
    }
}

/// What of the client's request a cache answer depends on.
pub(super) struct Want {
    head: bool,
    range: Option<String>,
}

impl Want {
    pub(super) fn of(req: &Request<Body>) -> Want {
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
