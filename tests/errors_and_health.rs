//! Errors graft answers itself (bad names and digests, an unreachable or
//! silent upstream) are OCI error bodies with the right status, and the
//! health endpoints tell liveness from readiness.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_oci_error, closed_port_url, sha256_digest, Api, FakeUpstream, Graft, Registry,
};
use reqwest::StatusCode;

async fn status_of(api: &Api, path: &str) -> StatusCode {
    Api::send(api.get(path)).await.status()
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
        assert_oci_error(Api::send(api.get(path)).await, 502, None).await;
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
