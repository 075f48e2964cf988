//! The one place errors become OCI error responses.
//!
//! Every layer has its own error type; each converts into [`Error`] here.
//! Each variant knows who caused it ([`Blame`], pingora's idea): the client
//! (4xx, with a message about its own input), the upstream (502/504, or the
//! upstream's own status when it refused a request graft made), or graft
//! itself (500). The cause is logged where it is converted, with the
//! request id; a client never sees a file path, a sled message or a Rust
//! error string — only a generic message and the id to quote.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::oci::ErrorCode;

/// Who caused an error: decides 4xx vs 502/504 vs 500, and how loudly it
/// is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The request was bad: the client can fix it.
    Client,
    /// The registry graft fronts failed or refused.
    Upstream,
    /// graft itself failed (a bug, the disk, the index).
    Internal,
}

/// An error graft itself answers with (never a passed-through upstream answer).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    /// The upstream cannot delete tags (distribution 2.x answers a tag
    /// `DELETE` with `DIGEST_INVALID`; the spec allows only `UNSUPPORTED`).
    #[error("the upstream registry cannot delete tags; delete the manifest by digest instead")]
    TagDeletionUnsupported,
    #[error("invalid manifest: {0}")]
    ManifestInvalid(String),
    #[error("manifest larger than {limit} bytes")]
    ManifestTooLarge { limit: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The upstream took a pushed blob under another digest than the one
    /// the client asked for (distribution 2.8 stores `sha512:` uploads as
    /// sha256): refused, never a silent substitution.
    #[error("{}", digest_not_kept(asked, stored))]
    DigestNotKept { asked: String, stored: String },
    #[error("not found")]
    NotFound,
    /// graft is at its configured request or connection cap.
    #[error("graft is at capacity; retry shortly")]
    Overloaded,
    #[error("upstream registry unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream registry did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    /// An upstream body graft reads itself went silent mid-way.
    #[error("upstream registry stopped sending for {0:?}")]
    UpstreamStalled(std::time::Duration),
    /// The upstream answered a request graft made on its own account (a
    /// fallback-tag read or write, a referrer check) with this status.
    #[error("upstream registry answered {status} to {what}")]
    UpstreamRefused { status: StatusCode, what: String },
    /// The upstream answered 429 to a request graft made on its own
    /// account: the client gets 429 with the upstream's `Retry-After`, as
    /// a passed-through answer would carry it.
    #[error("upstream registry answered 429 to {what}")]
    UpstreamThrottled {
        retry_after: Option<HeaderValue>,
        what: String,
    },
    /// The upstream sent something graft cannot use (an oversized or cut
    /// body, a malformed index).
    #[error("upstream registry sent an unusable answer: {0}")]
    UpstreamInvalid(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// graft cannot start (a bad TLS file, an unusable upstream URL): one
    /// line for the operator, never a request's answer.
    #[error("{0}")]
    Startup(String),
}

impl Error {
    /// Who caused this error.
    pub fn blame(&self) -> Blame {
        match self {
            Error::NameInvalid(_)
            | Error::DigestInvalid(_)
            | Error::TagDeletionUnsupported
            | Error::ManifestInvalid(_)
            | Error::ManifestTooLarge { .. }
            | Error::BadRequest(_)
            | Error::DigestNotKept { .. }
            | Error::NotFound => Blame::Client,
            Error::UpstreamUnreachable(_)
            | Error::UpstreamTimeout(_)
            | Error::UpstreamStalled(_)
            | Error::UpstreamRefused { .. }
            | Error::UpstreamThrottled { .. }
            | Error::UpstreamInvalid(_) => Blame::Upstream,
            Error::Overloaded | Error::Internal(_) | Error::Startup(_) => Blame::Internal,
        }
    }

    fn parts(&self) -> (StatusCode, ErrorCode) {
        match self {
            Error::NameInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            Error::DigestInvalid(_) | Error::DigestNotKept { .. } => {
                (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid)
            }
            Error::TagDeletionUnsupported => (StatusCode::BAD_REQUEST, ErrorCode::Unsupported),
            Error::ManifestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
            Error::ManifestTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::SizeInvalid)
            }
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::Unsupported),
            Error::NotFound => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
            Error::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            Error::UpstreamUnreachable(_) | Error::UpstreamInvalid(_) => {
                (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable)
            }
            Error::UpstreamTimeout(_) | Error::UpstreamStalled(_) => {
                (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable)
            }
            // The upstream's own no is passed on as a no; anything else it
            // refused is a bad gateway, not graft's 500.
            Error::UpstreamRefused { status, .. } => match *status {
                StatusCode::UNAUTHORIZED => (*status, ErrorCode::Unauthorized),
                StatusCode::FORBIDDEN => (*status, ErrorCode::Denied),
                StatusCode::TOO_MANY_REQUESTS => (*status, ErrorCode::TooManyRequests),
                _ => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
            },
            Error::UpstreamThrottled { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests)
            }
            Error::Internal(_) | Error::Startup(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown)
            }
        }
    }

    /// Whether the upstream could not answer right now (unreachable, no
    /// answer in time, a stalled body, a 5xx, a 429) — as opposed to an
    /// answer about the request: the case where what graft already knows
    /// may stand in for a client whose access is known.
    pub fn is_upstream_outage(&self) -> bool {
        match self {
            Error::UpstreamUnreachable(_)
            | Error::UpstreamTimeout(_)
            | Error::UpstreamStalled(_)
            | Error::UpstreamThrottled { .. } => true,
            Error::UpstreamRefused { status, .. } => status.is_server_error(),
            _ => false,
        }
    }

    /// What the client is told. Its own mistakes are described to it; the
    /// upstream's and graft's troubles get a fixed sentence, the details
    /// staying in the log line that carries the same request id.
    pub(crate) fn public_message(&self) -> String {
        match self {
            Error::UpstreamUnreachable(_) => "upstream registry unreachable".into(),
            Error::UpstreamTimeout(d) => format!("upstream registry did not answer within {d:?}"),
            Error::UpstreamStalled(d) => format!("upstream registry stopped sending for {d:?}"),
            Error::UpstreamRefused { status, .. } => {
                format!("upstream registry answered {}", status.as_u16())
            }
            Error::UpstreamThrottled { .. } => "upstream registry answered 429".into(),
            Error::UpstreamInvalid(_) => "upstream registry sent an unusable answer".into(),
            Error::Internal(_) | Error::Startup(_) => "internal error".into(),
            // Named one by one, so that a new variant has to decide here
            // whether its text may reach a client.
            Error::NameInvalid(_)
            | Error::DigestInvalid(_)
            | Error::TagDeletionUnsupported
            | Error::ManifestInvalid(_)
            | Error::ManifestTooLarge { .. }
            | Error::BadRequest(_)
            | Error::DigestNotKept { .. }
            | Error::NotFound
            | Error::Overloaded => self.to_string(),
        }
    }

    /// The OCI error response for this error, logged here with the request
    /// id (the one place errors meet clients).
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.parts();
        // Outside a request scope an id is made up here, so the answer and
        // the log line below still share one to quote.
        let request_id = crate::request_id::current().unwrap_or_else(crate::request_id::next);
        match self.blame() {
            // Shedding load is graft working as configured, not a fault.
            Blame::Internal if matches!(self, Error::Overloaded) => {
                tracing::warn!(request_id = %request_id, "request shed at the concurrency cap")
            }
            Blame::Internal => {
                tracing::error!(error = %self, request_id = %request_id, "internal error")
            }
            Blame::Upstream => {
                tracing::warn!(error = %self, request_id = %request_id, "upstream failure")
            }
            Blame::Client => {
                tracing::debug!(error = %self, request_id = %request_id, "request refused")
            }
        }
        let detail = match self.blame() {
            Blame::Client => serde_json::Value::Null,
            Blame::Upstream | Blame::Internal => serde_json::json!({ "request_id": request_id }),
        };
        let message = self.public_message();
        let mut resp = oci_error(status, code, &message, detail);
        // For the status page's last errors (recorded by the access-log
        // layer, which knows the route): only what the client was told.
        resp.extensions_mut().insert(crate::status::ErrorNote {
            status: status.as_u16(),
            code: code.as_str(),
            message,
            request_id: request_id.clone(),
            blame: self.blame(),
        });
        if let Error::UpstreamThrottled {
            retry_after: Some(v),
            ..
        } = self
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

fn digest_not_kept(asked: &str, stored: &str) -> String {
    let algorithm = |d: &str| d.split(':').next().unwrap_or("").to_string();
    if algorithm(asked) == algorithm(stored) {
        format!("the upstream registry stored this blob as {stored}, not {asked}")
    } else {
        format!(
            "the upstream registry does not support digest algorithm {}: it stored this blob as {stored}, not {asked}",
            algorithm(asked)
        )
    }
}

/// Builds an OCI error response.
pub fn oci_error(
    status: StatusCode,
    code: ErrorCode,
    message: &str,
    detail: serde_json::Value,
) -> Response<Body> {
    let json = serde_json::json!({
        "errors": [{ "code": code.as_str(), "message": message, "detail": detail }]
    });
    let bytes = Bytes::from(serde_json::to_vec(&json).expect("JSON values serialise"));
    let mut resp = Response::new(body::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl From<crate::oci::digest::InvalidDigest> for Error {
    fn from(e: crate::oci::digest::InvalidDigest) -> Self {
        Error::DigestInvalid(e.into_input())
    }
}

impl From<crate::oci::name::InvalidName> for Error {
    fn from(e: crate::oci::name::InvalidName) -> Self {
        Error::NameInvalid(e.into_input())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(e: Error) -> (StatusCode, serde_json::Value) {
        let resp = crate::request_id::scope("req-1".into(), async { e.into_response() }).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).expect("json"))
    }

    #[tokio::test]
    async fn internal_errors_name_the_request_but_not_their_cause() {
        let (status, json) =
            body_of(Error::Internal("sled: /var/lib/graft/index/db: EIO".into())).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let text = json.to_string();
        assert!(
            !text.contains("sled") && !text.contains("/var/lib"),
            "{text}"
        );
        assert_eq!(json["errors"][0]["detail"]["request_id"], "req-1");
    }

    #[tokio::test]
    async fn an_upstream_no_to_graft_s_own_write_is_the_upstream_s_answer() {
        let e = Error::UpstreamRefused {
            status: StatusCode::FORBIDDEN,
            what: "the fallback tag PUT".into(),
        };
        assert_eq!(e.blame(), Blame::Upstream);
        let (status, json) = body_of(e).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(json["errors"][0]["code"], "DENIED");
        let (status, _) = body_of(Error::UpstreamRefused {
            status: StatusCode::BAD_REQUEST,
            what: "x".into(),
        })
        .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn client_errors_describe_the_input() {
        let (status, json) = body_of(Error::DigestInvalid("sha256:zz".into())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(json["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sha256:zz")));
        assert!(json["errors"][0]["detail"].is_null());
    }

    /// What an upstream or internal cause may say: text that must never
    /// reach a client.
    const SECRET: &str = "sled: /var/lib/graft/index/db: Connection refused (os error 111)";

    fn refused(status: StatusCode) -> Error {
        Error::UpstreamRefused {
            status,
            what: SECRET.into(),
        }
    }

    /// Every variant, with the status, code and blame it must answer with.
    fn table() -> Vec<(Error, u16, &'static str, Blame)> {
        use std::time::Duration;
        use Blame::{Client, Internal, Upstream};
        let d = Duration::from_secs(5);
        let s = || SECRET.to_string();
        vec![
            (Error::NameInvalid("A".into()), 400, "NAME_INVALID", Client),
            (
                Error::DigestInvalid("x".into()),
                400,
                "DIGEST_INVALID",
                Client,
            ),
            (Error::TagDeletionUnsupported, 400, "UNSUPPORTED", Client),
            (
                Error::DigestNotKept {
                    asked: "sha512:ab".into(),
                    stored: "sha256:cd".into(),
                },
                400,
                "DIGEST_INVALID",
                Client,
            ),
            (
                Error::ManifestInvalid("y".into()),
                400,
                "MANIFEST_INVALID",
                Client,
            ),
            (
                Error::ManifestTooLarge { limit: 4 },
                413,
                "SIZE_INVALID",
                Client,
            ),
            (Error::BadRequest("z".into()), 400, "UNSUPPORTED", Client),
            (Error::NotFound, 404, "UNSUPPORTED", Client),
            (Error::Overloaded, 503, "UNAVAILABLE", Internal),
            (
                Error::UpstreamUnreachable(s()),
                502,
                "UNAVAILABLE",
                Upstream,
            ),
            (Error::UpstreamTimeout(d), 504, "UNAVAILABLE", Upstream),
            (Error::UpstreamStalled(d), 504, "UNAVAILABLE", Upstream),
            (
                refused(StatusCode::UNAUTHORIZED),
                401,
                "UNAUTHORIZED",
                Upstream,
            ),
            (
                refused(StatusCode::TOO_MANY_REQUESTS),
                429,
                "TOOMANYREQUESTS",
                Upstream,
            ),
            (
                refused(StatusCode::INTERNAL_SERVER_ERROR),
                502,
                "UNAVAILABLE",
                Upstream,
            ),
            (Error::UpstreamInvalid(s()), 502, "UNAVAILABLE", Upstream),
            (
                Error::UpstreamThrottled {
                    retry_after: None,
                    what: s(),
                },
                429,
                "TOOMANYREQUESTS",
                Upstream,
            ),
            (Error::Internal(s()), 500, "UNKNOWN", Internal),
            (Error::Startup(s()), 500, "UNKNOWN", Internal),
        ]
    }

    #[tokio::test]
    async fn every_error_answers_with_its_blame_s_status_and_code() {
        for (e, status, code, blame) in table() {
            let what = format!("{e:?}");
            assert_eq!(e.blame(), blame, "{what}");
            let (got, json) = body_of(e).await;
            assert_eq!(got.as_u16(), status, "{what}");
            assert_eq!(json["errors"][0]["code"], code, "{what}");
            assert!(json["errors"][0]["message"].is_string(), "{what}");
        }
    }

    #[tokio::test]
    async fn no_upstream_or_internal_cause_reaches_the_body() {
        for (e, _, _, blame) in table() {
            if blame == Blame::Client {
                continue;
            }
            let what = format!("{e:?}");
            let (_, json) = body_of(e).await;
            let text = json.to_string();
            for leak in ["sled", "/var/lib", "os error", "refused"] {
                assert!(!text.contains(leak), "{what} leaked `{leak}`: {text}");
            }
            assert_eq!(json["errors"][0]["detail"]["request_id"], "req-1", "{what}");
        }
    }

    #[tokio::test]
    async fn outside_a_request_scope_an_upstream_error_still_carries_an_id() {
        let resp = Error::UpstreamUnreachable("x".into()).into_response();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        let id = json["errors"][0]["detail"]["request_id"].as_str();
        assert!(id.is_some_and(|id| !id.is_empty()), "{json}");
    }

    #[tokio::test]
    async fn a_throttled_upstream_s_retry_after_reaches_the_client() {
        let e = Error::UpstreamThrottled {
            retry_after: Some(HeaderValue::from_static("17")),
            what: "graft's HEAD of a fallback tag".into(),
        };
        assert!(e.is_upstream_outage());
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "17");
        assert!(!Error::UpstreamRefused {
            status: StatusCode::BAD_REQUEST,
            what: "x".into()
        }
        .is_upstream_outage());
    }

    #[test]
    fn a_startup_error_reads_as_its_own_line() {
        let e = Error::Startup("upstream.ca_file /etc/ca.pem: no PEM certificates found".into());
        assert_eq!(
            e.to_string(),
            "upstream.ca_file /etc/ca.pem: no PEM certificates found"
        );
    }
}
