//! `/healthz` (the process answers) and `/readyz` (the upstream answers).
//! Each probe of the upstream is also recorded for the status page.

use std::time::Instant;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use super::Proxy;
use crate::body::{self, Body};
use crate::error::oci_error;
use crate::oci::ErrorCode;
use crate::status::ProbeResult;

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
    let (probe, detail) = probe_with_detail(proxy).await;
    if probe.healthy {
        return json(StatusCode::OK, "{\"status\":\"ready\"}\n");
    }
    let why = detail.as_deref().unwrap_or("no answer");
    oci_error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        &format!("not ready: {why}"),
        serde_json::Value::Null,
    )
}

/// Asks the upstream's `/v2/` once, within `upstream.ready_timeout`, and
/// records the result (health, round trip) for the status page.
pub(crate) async fn probe(proxy: &Proxy) -> ProbeResult {
    probe_with_detail(proxy).await.0
}

/// [`probe`], plus the cause of a failure as `/readyz` has always told it
/// (the page keeps only the public sentence).
async fn probe_with_detail(proxy: &Proxy) -> (ProbeResult, Option<String>) {
    let started = Instant::now();
    let ask = async {
        let req = Request::builder()
            .method(Method::GET)
            .uri(proxy.upstream.uri("/v2/")?)
            .body(body::empty())
            .map_err(|e| crate::error::Error::Internal(e.to_string()))?;
        let (resp, _) = proxy.upstream.send(req).await?;
        Ok::<_, crate::error::Error>(resp.status())
    };
    let answered = tokio::time::timeout(proxy.config.upstream.ready_timeout, ask).await;
    let rtt_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (status, problem, detail) = match answered {
        Ok(Ok(status)) => (Some(status.as_u16()), None, None),
        Ok(Err(e)) => (None, Some(e.public_message()), Some(e.to_string())),
        Err(_) => {
            let why = "upstream did not answer in time".to_string();
            (None, Some(why.clone()), Some(why))
        }
    };
    let result = ProbeResult {
        checked_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        healthy: status.is_some(),
        status,
        rtt_ms,
        problem,
    };
    proxy.board.record_probe(result.clone());
    (result, detail)
}
