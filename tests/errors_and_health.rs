//! Errors graft answers itself (bad names and digests, an unreachable or
//! silent upstream) are OCI error bodies with the right status, and the
//! health endpoints tell liveness from readiness.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_oci_error, closed_port_url, sha256_digest, Api, FakeUpstream, Graft, Registry,
};
use graft::config::ReferrersMode;
use reqwest::StatusCode;

async fn status_of(api: &Api, path: &str) -> StatusCode {
    Api::send(api.get(path)).await.status()
}

/// An upstream failure tells the client a fixed sentence and the request id
/// to quote, never the Rust error underneath.
fn assert_generic_upstream_error(body: &serde_json::Value, what: &str) {
    let error = &body["errors"][0];
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("upstream registry"), "{what}: {body}");
    let id = error["detail"]["request_id"].as_str().unwrap_or_default();
    assert!(!id.is_empty(), "{what}: no request_id in detail: {body}");
    let text = body.to_string().to_ascii_lowercase();
    for leak in [
        "os error",
        "connection refused",
        "tcp connect",
        "hyper",
        "client error",
    ] {
        assert!(
            !text.contains(leak),
            "{what}: `{leak}` reached the client: {body}"
        );
    }
}

#[tokio::test]
async fn repository_names_outside_the_grammar_get_name_invalid_without_reaching_upstream() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let digest = sha256_digest(b"x");
    let bad = [
        "/v2/UPPER/manifests/x".to_owned(),
        "/v2/library/Web/tags/list".to_owned(),
        format!("/v2/trailing-/blobs/{digest}"),
        "/v2/a___b/manifests/latest".to_owned(),
    ];

    for path in &bad {
        let body =
            assert_oci_error(Api::send(api.get(path)).await, 400, Some("NAME_INVALID")).await;
        assert!(
            body["errors"][0].get("detail").is_some(),
            "{path}: errors[0] has a detail: {body}"
        );
    }

    // A valid request afterwards marks how far the upstream's log got.
    assert_eq!(
        status_of(&api, "/v2/fine/tags/list").await,
        StatusCode::NOT_FOUND
    );
    registry.wait_for_access("the marker request", |e| e.uri == "/v2/fine/tags/list");
    let reached: Vec<_> = registry
        .access_log()
        .into_iter()
        .filter(|e| bad.contains(&e.uri))
        .collect();
    assert!(
        reached.is_empty(),
        "rejected requests reached the upstream: {reached:?}"
    );
}

#[tokio::test]
async fn malformed_digests_in_blob_and_manifest_paths_get_digest_invalid() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let upper_hex = format!("sha256:{}", "AB".repeat(32));
    let short_hex = format!("sha256:{}", "ab".repeat(31));

    for path in [
        "/v2/a/blobs/sha256:zz".to_owned(),
        "/v2/a/manifests/sha256:zz".to_owned(),
        format!("/v2/a/blobs/{upper_hex}"),
        format!("/v2/a/blobs/{short_hex}"),
    ] {
        let body =
            assert_oci_error(Api::send(api.get(&path)).await, 400, Some("DIGEST_INVALID")).await;
        assert!(
            body["errors"][0].get("detail").is_some(),
            "{path}: errors[0] has a detail: {body}"
        );
    }
}

#[tokio::test]
async fn unreachable_upstream_gives_502_with_an_oci_error_and_readyz_503() {
    let graft = Graft::start_for_upstream(&closed_port_url(), |_| {});
    let api = Api::for_graft(&graft);

    for path in [
        "/v2/",
        "/v2/app/tags/list",
        &format!("/v2/app/blobs/{}", sha256_digest(b"x")),
    ] {
        let body = assert_oci_error(Api::send(api.get(path)).await, 502, Some("UNAVAILABLE")).await;
        assert_generic_upstream_error(&body, path);
    }
    assert_eq!(status_of(&api, "/healthz").await, StatusCode::OK);
    assert_eq!(
        status_of(&api, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn upstream_that_never_answers_gives_504_after_the_response_timeout() {
    let upstream = FakeUpstream::hanging();
    let graft = Graft::start_for_upstream(&upstream.url(), |config| {
        config.upstream.response_timeout = Duration::from_secs(1);
        config.upstream.ready_timeout = Duration::from_millis(500);
    });
    let api = Api::for_graft(&graft);

    let started = Instant::now();
    assert_oci_error(Api::send(api.get("/v2/app/tags/list")).await, 504, None).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "504 came before the timeout: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "504 came too late: {waited:?}"
    );
    assert!(
        !upstream.requests().is_empty(),
        "the request reached the silent upstream"
    );

    assert_eq!(
        status_of(&api, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(status_of(&api, "/healthz").await, StatusCode::OK);
}

#[tokio::test]
async fn readyz_follows_the_upstream_while_healthz_stays_200() {
    let mut registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    assert_eq!(status_of(&api, "/healthz").await, StatusCode::OK);
    assert_eq!(status_of(&api, "/readyz").await, StatusCode::OK);

    registry.stop();
    assert_eq!(
        status_of(&api, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(status_of(&api, "/healthz").await, StatusCode::OK);

    registry.restart();
    assert_eq!(status_of(&api, "/readyz").await, StatusCode::OK);
}

#[tokio::test]
async fn an_upstream_that_stalls_a_fallback_tag_body_fails_the_referrers_query_cleanly() {
    // Every request gets a 200 index head and then nothing: the HEAD of the
    // fallback tag succeeds, the GET of its body never completes.
    let digest = sha256_digest(b"the fallback tag");
    let upstream = FakeUpstream::responding(&format!(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: application/vnd.oci.image.index.v1+json\r\n\
         Docker-Content-Digest: {digest}\r\n\
         Content-Length: 512\r\n\r\n"
    ));
    let graft = Graft::start_for_upstream(&upstream.url(), |config| {
        config.referrers.mode = ReferrersMode::Synthesize;
        config.upstream.response_timeout = Duration::from_secs(10);
        config.upstream.body_timeout = Duration::from_secs(1);
    });
    let api = Api::for_graft(&graft);
    let subject = sha256_digest(b"a subject");
    let tag = subject.replace(':', "-");

    // A bound for the test run, not an assertion on timing: a hang fails
    // here instead of hanging the suite.
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        Api::send(api.get(&format!("/v2/app/referrers/{subject}"))),
    )
    .await
    .expect("graft answered instead of hanging on the stalled body");
    let body = assert_oci_error(answer, 504, Some("UNAVAILABLE")).await;
    assert_generic_upstream_error(&body, "referrers");
    assert!(
        upstream
            .requests()
            .iter()
            .any(|r| r.request_line == format!("GET /v2/app/manifests/{tag} HTTP/1.1")),
        "graft read the fallback tag body: {:?}",
        upstream.requests()
    );
}
