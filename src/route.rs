//! Which request is which: `Route::parse(method, path)` names the endpoint
//! of the distribution spec ("Endpoints" table) a request is for, validating
//! names and digests on the way so handlers receive only well-formed ones.

use http::Method;
use percent_encoding::percent_decode_str;

use crate::error::Error;
use crate::oci::{Digest, Reference, RepoName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Health,
    Ready,
    Metrics,
    /// `/v2/`: API version check (and the auth challenge).
    Base,
    Catalog,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    /// `POST /v2/<name>/blobs/uploads/`
    UploadStart {
        name: RepoName,
    },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload {
        name: RepoName,
        id: String,
    },
    TagsList {
        name: RepoName,
    },
    Referrers {
        name: RepoName,
        digest: Digest,
    },
    /// Under `/v2/` but not an endpoint graft knows: passed through.
    OtherV2,
    /// Outside `/v2/` and not one of graft's own endpoints.
    NotFound,
}

impl Route {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Health => "healthz",
            Route::Ready => "readyz",
            Route::Metrics => "metrics",
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } | Route::Upload { .. } => "upload",
            Route::TagsList { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::OtherV2 => "other",
            Route::NotFound => "not_found",
        }
    }

    /// Parses a request path (without query). Malformed names, digests and
    /// path tricks (`.`/`..` segments, empty segments) are refused here.
    pub fn parse(method: &Method, path: &str) -> Result<Route, Error> {
        match path {
            "/healthz" => return Ok(Route::Health),
            "/readyz" => return Ok(Route::Ready),
            "/metrics" => return Ok(Route::Metrics),
            "/v2" | "/v2/" => return Ok(Route::Base),
            "/v2/_catalog" => return Ok(Route::Catalog),
            _ => {}
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Ok(Route::NotFound);
        };
        let segs: Vec<&str> = rest.split('/').collect();
        // Dot segments would be normalised away by some upstreams and HTTP
        // stacks, letting `/v2/a/../b` reach a repository the path does not
        // name. Nothing legitimate has them.
        if segs.iter().any(|s| {
            let d = percent_decode_str(s).decode_utf8_lossy();
            d == "." || d == ".."
        }) {
            return Err(Error::NameInvalid(format!(
                "path `{path}` has dot segments"
            )));
        }
        let n = segs.len();
        let tail = |k: usize| &segs[n - k..];
        let name_of = |k: usize| -> Result<RepoName, Error> {
            Ok(RepoName::parse(&segs[..n - k].join("/"))?)
        };
        let decoded = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();

        if n >= 4 && tail(3)[..2] == ["blobs", "uploads"] {
            let name = name_of(3)?;
            let id = tail(1)[0];
            if id.is_empty() {
                return Ok(Route::UploadStart { name });
            }
            if !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
            {
                return Err(Error::BadRequest(format!("invalid upload id `{id}`")));
            }
            return Ok(Route::Upload {
                name,
                id: id.to_string(),
            });
        }
        if n >= 3 {
            let (kind, last) = (tail(2)[0], tail(2)[1]);
            match kind {
                "manifests" => {
                    let name = name_of(2)?;
                    let raw = decoded(last);
                    let reference = Reference::parse(&raw).ok_or_else(|| {
                        if raw.contains(':') {
                            Error::DigestInvalid(raw.clone())
                        } else {
                            Error::ReferenceInvalid(raw.clone())
                        }
                    })?;
                    return Ok(Route::Manifest { name, reference });
                }
                "blobs" => {
                    let name = name_of(2)?;
                    let digest = decoded(last).parse()?;
                    return Ok(Route::Blob { name, digest });
                }
                "referrers" => {
                    let name = name_of(2)?;
                    let digest = decoded(last).parse()?;
                    return Ok(Route::Referrers { name, digest });
                }
                "tags" if last == "list" => {
                    return Ok(Route::TagsList { name: name_of(2)? });
                }
                _ => {}
            }
        }
        let _ = method;
        Ok(Route::OtherV2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Result<Route, Error> {
        Route::parse(&Method::GET, path)
    }

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn names_may_contain_slashes_and_keywords() {
        let r = parse(&format!("/v2/a/manifests/b/manifests/{D}")).expect("valid");
        let Route::Manifest { name, reference } = r else {
            panic!("not a manifest route")
        };
        assert_eq!(name.as_str(), "a/manifests/b");
        assert_eq!(reference.to_string(), D);
    }

    #[test]
    fn every_endpoint_is_recognised() {
        assert_eq!(parse("/v2/").expect("ok"), Route::Base);
        assert_eq!(parse("/v2/_catalog").expect("ok"), Route::Catalog);
        assert!(matches!(
            parse("/v2/a/b/tags/list"),
            Ok(Route::TagsList { .. })
        ));
        assert!(matches!(
            parse(&format!("/v2/a/blobs/{D}")),
            Ok(Route::Blob { .. })
        ));
        assert!(matches!(
            parse(&format!("/v2/a/blobs/{}", D.replace(':', "%3A"))),
            Ok(Route::Blob { .. })
        ));
        assert!(matches!(
            parse("/v2/a/blobs/uploads/"),
            Ok(Route::UploadStart { .. })
        ));
        assert!(matches!(
            parse("/v2/a/blobs/uploads/abc-1"),
            Ok(Route::Upload { .. })
        ));
        assert!(matches!(
            parse(&format!("/v2/a/referrers/{D}")),
            Ok(Route::Referrers { .. })
        ));
        assert_eq!(parse("/v2/a/whatever").expect("ok"), Route::OtherV2);
        assert_eq!(parse("/elsewhere").expect("ok"), Route::NotFound);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            parse("/v2/UPPER/manifests/x"),
            Err(Error::NameInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/blobs/sha256:zz"),
            Err(Error::DigestInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/manifests/sha256:zz"),
            Err(Error::DigestInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/manifests/-bad"),
            Err(Error::ReferenceInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/referrers/nope"),
            Err(Error::DigestInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/../b/tags/list"),
            Err(Error::NameInvalid(_))
        ));
        assert!(matches!(
            parse("/v2/a/%2e%2e/b/tags/list"),
            Err(Error::NameInvalid(_))
        ));
        assert!(matches!(
            parse("/v2//a/tags/list"),
            Err(Error::NameInvalid(_))
        ));
        assert!(parse("/v2/a/blobs/uploads/x%2fy").is_err());
    }
}
