//! `/healthz` (the process answers) and `/readyz` (the upstream answers).

use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use super::Proxy;
use crate::body::{self, Body};
use crate::error::oci_error;
use crate::oci::ErrorCode;

fn json(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn healthz() -> Response<Body> {
    json(StatusCode::OK, "{\"status\":\"ok\"}\n")
}

/// Ready when the upstream's `/v2/` answers at all within
/// `upstream.ready_timeout`: a 401 means it is there and wants credentials.
pub(crate) async fn readyz(proxy: &Proxy) -> Response<Body> {
    let probe = async {
        let req = Request::builder()
            .method(Method::GET)
            .uri(proxy.upstream.uri("/v2/")?)
            .body(body::empty())
            .map_err(|e| crate::error::Error::Internal(e.to_string()))?;
        let (resp, _) = proxy.upstream.send(req).await?;
        Ok::<_, crate::error::Error>(resp.status())
    };
    match tokio::time::timeout(proxy.config.upstream.ready_timeout, probe).await {
        Ok(Ok(_)) => json(StatusCode::OK, "{\"status\":\"ready\"}\n"),
        Ok(Err(e)) => oci_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            &format!("not ready: {e}"),
            serde_json::Value::Null,
        ),
        Err(_) => oci_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "not ready: upstream did not answer in time",
            serde_json::Value::Null,
        ),
    }
}
