//! An upstream with htpasswd auth or HTTPS: graft passes credentials and
//! challenges through untouched, and trusts exactly the CAs it is given.

mod common;

use common::{assert_oci_error, header_str, Api, Graft, Registry, RegistryOptions, TestImage};
use reqwest::StatusCode;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse battery";

fn htpasswd_registry() -> Registry {
    Registry::start_with(RegistryOptions::default().basic_auth(USER, PASSWORD))
}

#[tokio::test]
async fn right_basic_credentials_push_and_pull_through_graft() {
    let registry = htpasswd_registry();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft).with_basic_auth(USER, PASSWORD);
    let image = TestImage::build(2);

    api.push_image("team/app", "v1", &image).await;

    assert_eq!(api.get_manifest("team/app", "v1").await, image.manifest);
    for blob in image.blobs() {
        assert_eq!(api.get_blob("team/app", &blob.digest).await, blob.data);
    }
    // The upstream accepted the client's own credentials.
    registry.wait_for_access("the authenticated manifest PUT", |e| {
        e.method == "PUT" && e.uri == "/v2/team/app/manifests/v1" && e.status == 201
    });
}

#[tokio::test]
async fn missing_or_wrong_credentials_get_the_upstream_401_and_challenge_unchanged() {
    let registry = htpasswd_registry();
    let graft = Graft::start(&registry);
    let image = TestImage::build(1);
    Api::for_registry(&registry)
        .push_image("team/app", "v1", &image)
        .await;

    let anonymous = (Api::for_graft(&graft), Api::new(&registry.url()));
    let wrong = (
        Api::for_graft(&graft).with_basic_auth(USER, "wrong"),
        Api::new(&registry.url()).with_basic_auth(USER, "wrong"),
    );
    for (who, (via_graft, direct)) in [("anonymous", anonymous), ("wrong password", wrong)] {
        for path in [
            "/v2/",
            "/v2/team/app/manifests/v1",
            "/v2/team/app/tags/list",
        ] {
            let got = Api::send(via_graft.get(path)).await;
            let want = Api::send(direct.get(path)).await;
            assert_eq!(
                want.status(),
                StatusCode::UNAUTHORIZED,
                "{who} {path}: upstream status"
            );
            assert_eq!(
                got.status(),
                StatusCode::UNAUTHORIZED,
                "{who} {path}: status through graft"
            );
            let challenge = header_str(want.headers(), "www-authenticate");
            assert_eq!(
                challenge.as_deref(),
                Some("Basic realm=\"graft-test\""),
                "{who} {path}"
            );
            assert_eq!(
                header_str(got.headers(), "www-authenticate"),
                challenge,
                "{who} {path}: challenge"
            );
            let want_body = want.text().await.expect("upstream body");
            let got_body = got.text().await.expect("body through graft");
            assert_eq!(got_body, want_body, "{who} {path}: body");
        }
    }
}

#[tokio::test]
async fn readyz_counts_an_auth_challenge_as_a_reachable_upstream() {
    let registry = htpasswd_registry();
    let graft = Graft::start(&registry);
    let response = Api::send(Api::for_graft(&graft).get("/readyz")).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn https_upstream_signed_by_the_configured_ca_serves_push_and_pull() {
    let registry = Registry::start_with(RegistryOptions::default().tls());
    assert!(registry.url().starts_with("https://"));
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);
    let image = TestImage::build(2);

    api.push_image("secure/app", "v1", &image).await;

    assert_eq!(api.get_manifest("secure/app", "v1").await, image.manifest);
    for blob in image.blobs() {
        assert_eq!(api.get_blob("secure/app", &blob.digest).await, blob.data);
    }
    let direct = Api::for_registry(&registry);
    assert_eq!(
        direct.get_manifest("secure/app", &image.digest).await,
        image.manifest
    );
    assert_eq!(Api::send(api.get("/readyz")).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_certificate_gives_502() {
    let registry = Registry::start_with(RegistryOptions::default().tls());
    let graft = Graft::start_with(&registry, |config| config.upstream.ca_file = None);
    let api = Api::for_graft(&graft);

    for path in ["/v2/", "/v2/secure/app/tags/list"] {
        assert_oci_error(Api::send(api.get(path)).await, 502, None).await;
    }
    assert_eq!(
        Api::send(api.get("/readyz")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}
