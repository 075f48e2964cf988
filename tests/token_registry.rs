//! graft in front of a Bearer-token registry (distribution with `auth:
//! token`) and the test token service of `tests/common/token.rs`.

mod common;

use common::token::{Grant, DELETE_PULL, PULL, PUSH_PULL};
use common::{header_str, require_tool, Api, Graft, Registry, RegistryOptions, TestImage};
use common::{TokenOptions, TokenService};
use reqwest::StatusCode;

const PASSWORD: &str = "token-test-password";

/// A token service with a pusher, a reader and a deleter on every
/// repository, and a registry that trusts it.
fn token_registry(options: TokenOptions) -> (TokenService, Registry) {
    let service = TokenService::start(
        options
            .user("pusher", PASSWORD, &[Grant::new("*", PUSH_PULL)])
            .user("reader", PASSWORD, &[Grant::new("*", PULL)])
            .user("deleter", PASSWORD, &[Grant::new("*", DELETE_PULL)]),
    );
    let registry =
        Registry::start_with(RegistryOptions::default().token_auth(service.registry_auth()));
    (service, registry)
}

/// Fetches a token from the realm as a client would.
async fn fetch_token(service: &TokenService, user: &str, scope: &str) -> (StatusCode, String) {
    let response = Api::send(
        common::api::http_client(None)
            .get(service.realm())
            .query(&[("service", service.service()), ("scope", scope)])
            .basic_auth(user, Some(PASSWORD)),
    )
    .await;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["token"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn token_service_grants_only_the_allowed_part_of_a_scope() {
    let (service, _registry) = token_registry(TokenOptions::default());

    let (status, _) = fetch_token(&service, "reader", "repository:app/one:pull,push").await;
    assert_eq!(status, StatusCode::OK);
    let issued = service.issued();
    let last = issued.last().expect("a token was issued");
    assert_eq!(last.user.as_deref(), Some("reader"));
    assert_eq!(last.access.len(), 1);
    assert_eq!(last.access[0].name, "app/one");
    assert_eq!(last.access[0].actions, vec!["pull".to_owned()]);

    let refused = Api::send(
        common::api::http_client(None)
            .get(service.realm())
            .basic_auth("reader", Some("wrong")),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let anonymous = Api::send(common::api::http_client(None).get(service.realm())).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn pushes_and_pulls_through_graft_with_tokens_and_the_registry_refuses_a_pull_token_push() {
    let (service, registry) = token_registry(TokenOptions::default());
    let graft = Graft::start(&registry);

    // The registry's challenge reaches the client through graft unchanged.
    let challenge = Api::send(Api::for_graft(&graft).get("/v2/")).await;
    assert_eq!(challenge.status(), StatusCode::UNAUTHORIZED);
    let www = header_str(challenge.headers(), "www-authenticate").expect("a challenge");
    assert!(
        www.starts_with("Bearer ") && www.contains(&service.realm()),
        "challenge `{www}`"
    );

    let (_, push_token) = fetch_token(&service, "pusher", "repository:app/one:pull,push").await;
    let pusher = Api::for_graft(&graft).with_bearer(&push_token);
    let image = TestImage::build(1);
    pusher.push_image("app/one", "v1", &image).await;
    assert_eq!(pusher.get_manifest("app/one", "v1").await, image.manifest);

    let (_, pull_token) = fetch_token(&service, "reader", "repository:app/one:pull,push").await;
    let reader = Api::for_graft(&graft).with_bearer(&pull_token);
    assert_eq!(reader.get_manifest("app/one", "v1").await, image.manifest);
    for api in [
        reader.clone(),
        Api::for_registry(&registry).with_bearer(&pull_token),
    ] {
        let push =
            Api::send(api.request(reqwest::Method::POST, "/v2/app/one/blobs/uploads/")).await;
        assert_eq!(
            push.status(),
            StatusCode::UNAUTHORIZED,
            "{}",
            api.base_url()
        );
    }

    // Tokens minted directly: expired, or for another repository.
    let expired = service.mint(
        "pusher",
        &[common::token::Access::repository("app/one", PULL)],
        -120,
    );
    let other = service.mint_for("app/other", PULL);
    for token in [expired, other] {
        let direct = Api::for_registry(&registry).with_bearer(&token);
        let response =
            Api::send(direct.get(&format!("/v2/app/one/manifests/{}", image.digest))).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn skopeo_follows_the_token_challenge_through_graft() {
    let (service, registry) = token_registry(TokenOptions::default());
    let graft = Graft::start(&registry);
    let work = tempfile::tempdir().expect("work dir");
    let image = TestImage::build(2);
    let source = work.path().join("source");
    image.write_oci_layout(&source, "v1");
    let creds = format!("pusher:{PASSWORD}");
    let remote = format!("docker://{}/app/skopeo:v1", graft.host());

    let output = tokio::process::Command::new(require_tool("skopeo"))
        .args(["copy", "--insecure-policy", "--preserve-digests"])
        .args(["--dest-tls-verify=false"])
        .args(["--dest-creds", &creds])
        .arg(format!("oci:{}:v1", source.display()))
        .arg(&remote)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !service.issued_to("pusher").is_empty(),
        "skopeo fetched a token"
    );
    let (_, token) = fetch_token(&service, "reader", "repository:app/skopeo:pull").await;
    let direct = Api::for_registry(&registry).with_bearer(&token);
    assert_eq!(
        direct.get_manifest("app/skopeo", "v1").await,
        image.manifest
    );
}
