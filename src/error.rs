//! The one place errors become OCI error responses.
//!
//! Every layer has its own error type; each converts into [`Error`] here,
//! and [`Error::into_response`] writes the
//! `{"errors":[{"code","message","detail"}]}` body with the right status.
//! The cause is logged where it is converted; the client sees a clean code.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::oci::ErrorCode;

/// An error graft itself answers with (never a passed-through upstream answer).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    #[error("invalid reference: {0}")]
    ReferenceInvalid(String),
    #[error("invalid manifest: {0}")]
    ManifestInvalid(String),
    #[error("manifest larger than {limit} bytes")]
    ManifestTooLarge { limit: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("upstream registry unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream registry did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    fn parts(&self) -> (StatusCode, ErrorCode) {
        match self {
            Error::NameInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            Error::DigestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            Error::ReferenceInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
            Error::ManifestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
            Error::ManifestTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::SizeInvalid)
            }
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::Unsupported),
            Error::NotFound => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
            Error::UpstreamUnreachable(_) => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
            Error::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable),
            Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown),
        }
    }

    /// The OCI error response for this error.
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.parts();
        match &self {
            Error::Internal(_) => tracing::error!(error = %self, "internal error"),
            Error::UpstreamUnreachable(_) | Error::UpstreamTimeout(_) => {
                tracing::warn!(error = %self, "upstream failure")
            }
            _ => tracing::debug!(error = %self, "request refused"),
        }
        oci_error(status, code, &self.to_string(), serde_json::Value::Null)
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
        Error::DigestInvalid(e.0)
    }
}

impl From<crate::oci::name::InvalidName> for Error {
    fn from(e: crate::oci::name::InvalidName) -> Self {
        Error::NameInvalid(e.0)
    }
}
