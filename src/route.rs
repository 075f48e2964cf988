//! Which request is which: `Route::parse(path)` names the endpoint
//! of the distribution spec ("Endpoints" table) a request is for, validating
//! names and digests on the way so handlers receive only well-formed ones.
//!
//! graft refuses only what it must interpret and cannot: a repository name
//! or digest it would use as a key or a path (400 `NAME_INVALID`,
//! `DIGEST_INVALID`, as the spec's error table names them), dot segments,
//! and upload ids it keys its upload tees by. A manifest reference that is
//! neither a tag nor a digest is the upstream's to judge (the spec's pull
//! section answers it 404 `MANIFEST_UNKNOWN`): it is forwarded as it came.

use percent_encoding::percent_decode_str;

use crate::error::Error;
use crate::oci::{Digest, Reference, RepoName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
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
    /// `<name>/manifests/<reference>` whose reference is neither a tag nor
    /// a digest (no `:`): forwarded for the upstream to answer.
    ManifestUnparsed {
        name: RepoName,
        raw: String,
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
    /// `/`: the status page (HTML).
    Status,
    /// `/-/status.json`: the status page's data.
    StatusJson,
}

impl Route {
    /// A short label for logs and metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Route::Health => "healthz",
            Route::Ready => "readyz",
            Route::Metrics => "metrics",
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Manifest { .. } | Route::ManifestUnparsed { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } | Route::Upload { .. } => "upload",
            Route::TagsList { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::OtherV2 => "other",
            Route::NotFound => "not_found",
            Route::Status | Route::StatusJson => "status",
        }
    }

    /// Parses a request path (without query). Malformed names, digests and
    /// path tricks (`.`/`..` segments, empty segments) are refused here.
    /// The method does not enter into it: every method of a path goes to
    /// the same handler, which decides what it does with it.
    pub(crate) fn parse(path: &str) -> Result<Route, Error> {
        match path {
            "/healthz" => return Ok(Route::Health),
            "/readyz" => return Ok(Route::Ready),
            "/metrics" => return Ok(Route::Metrics),
            "/v2" | "/v2/" => return Ok(Route::Base),
            "/v2/_catalog" => return Ok(Route::Catalog),
            "/" => return Ok(Route::Status),
            "/-/status.json" => return Ok(Route::StatusJson),
            _ => {}
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Ok(Route::NotFound);
        };
        let segs: Vec<&str> = rest.split('/').collect();
        refuse_dot_segments(path, &segs)?;
        if let Some(route) = upload(&segs)? {
            return Ok(route);
        }
        Ok(under_name(&segs)?.unwrap_or(Route::OtherV2))
    }
}

/// Dot segments would be normalised away by some upstreams and HTTP stacks,
/// letting `/v2/a/../b` reach a repository the path does not name. Nothing
/// legitimate has them.
fn refuse_dot_segments(path: &str, segs: &[&str]) -> Result<(), Error> {
    let dotted = segs.iter().any(|s| {
        let d = percent_decode_str(s).decode_utf8_lossy();
        d == "." || d == ".."
    });
    if dotted {
        return Err(Error::NameInvalid(format!(
            "path `{path}` has dot segments"
        )));
    }
    Ok(())
}

/// The repository name: every segment before the last `k`.
fn name_before(segs: &[&str], k: usize) -> Result<RepoName, Error> {
    Ok(RepoName::parse(&segs[..segs.len() - k].join("/"))?)
}

fn decoded(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// `<name>/blobs/uploads/` and `<name>/blobs/uploads/<id>`.
fn upload(segs: &[&str]) -> Result<Option<Route>, Error> {
    let n = segs.len();
    if n < 4 || segs[n - 3..n - 1] != ["blobs", "uploads"] {
        return Ok(None);
    }
    let name = name_before(segs, 3)?;
    let id = segs[n - 1];
    if id.is_empty() {
        return Ok(Some(Route::UploadStart { name }));
    }
    let well_formed = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='));
    if !well_formed {
        return Err(Error::BadRequest(format!("invalid upload id `{id}`")));
    }
    Ok(Some(Route::Upload {
        name,
        id: id.to_string(),
    }))
}

/// `<name>/manifests/<ref>`, `<name>/blobs/<digest>`,
/// `<name>/referrers/<digest>` and `<name>/tags/list`.
fn under_name(segs: &[&str]) -> Result<Option<Route>, Error> {
    let n = segs.len();
    if n < 3 {
        return Ok(None);
    }
    let (kind, last) = (segs[n - 2], segs[n - 1]);
    let route = match kind {
        "manifests" => {
            let name = name_before(segs, 2)?;
            let raw = decoded(last);
            match Reference::parse(&raw) {
                Some(reference) => Route::Manifest { name, reference },
                // Something with a `:` was meant as a digest, which graft
                // keys its cache by: a malformed one is refused as such.
                None if raw.contains(':') => return Err(Error::DigestInvalid(raw)),
                None => Route::ManifestUnparsed { name, raw },
            }
        }
        "blobs" => Route::Blob {
            name: name_before(segs, 2)?,
            digest: decoded(last).parse()?,
        },
        "referrers" => Route::Referrers {
            name: name_before(segs, 2)?,
            digest: decoded(last).parse()?,
        },
        "tags" if last == "list" => Route::TagsList {
            name: name_before(segs, 2)?,
        },
        _ => return Ok(None),
    };
    Ok(Some(route))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Result<Route, Error> {
        Route::parse(path)
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
        for odd in [".INVALID_MANIFEST_NAME", "-bad", "%2Eh"] {
            assert!(
                matches!(
                    parse(&format!("/v2/a/manifests/{odd}")),
                    Ok(Route::ManifestUnparsed { .. })
                ),
                "{odd}"
            );
        }
        assert_eq!(parse("/elsewhere").expect("ok"), Route::NotFound);
        assert_eq!(parse("/").expect("ok"), Route::Status);
        assert_eq!(parse("/-/status.json").expect("ok"), Route::StatusJson);
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
            parse("/v2/UPPER/manifests/-bad"),
            Err(Error::NameInvalid(_))
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
