//! `referrers.mode`: `synthesize` and `auto` answer the referrers API over a
//! 1.0 upstream; `passthrough` forwards it to the upstream as is.

mod common;

use common::artifacts::{
    artifact, expected_descriptor, push_subject, referrer_list, referrers, MANIFEST,
};
use common::{settle, sha256_digest, Api, Graft, Registry};
use graft::config::ReferrersMode;
use reqwest::StatusCode;

#[tokio::test]
async fn auto_and_synthesize_answer_over_a_1_0_upstream_and_passthrough_forwards() {
    let registry = Registry::start();
    let direct = Api::for_registry(&registry);
    let subject = push_subject(&direct, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);

    for mode in [ReferrersMode::Auto, ReferrersMode::Synthesize] {
        let graft = Graft::start_with(&registry, |c| c.referrers.mode = mode);
        let api = Api::for_graft(&graft);
        api.push_manifest("app", &sha256_digest(&sig), MANIFEST, sig.clone())
            .await;
        let list = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
        assert_eq!(list, vec![expected_descriptor(&sig)], "{mode:?}");
    }

    // distribution 2.8 has no referrers API: passed through, its 404 shows.
    let graft = Graft::start_with(&registry, |c| c.referrers.mode = ReferrersMode::Passthrough);
    let api = Api::for_graft(&graft);
    let resp = Api::send(api.get(&format!("/v2/app/referrers/{}", subject.digest))).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    registry.wait_for_access("the forwarded referrers request", |e| {
        e.method == "GET" && e.uri.starts_with("/v2/app/referrers/")
    });
}

#[tokio::test]
async fn within_tag_ttl_the_fallback_tag_is_not_rechecked() {
    let registry = Registry::start();
    let graft = Graft::start_with(&registry, |c| {
        c.referrers.tag_ttl = std::time::Duration::from_secs(3600)
    });
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    api.push_manifest("app", &sha256_digest(&sig), MANIFEST, sig.clone())
        .await;
    let tag_path = format!("/v2/app/manifests/{}", subject.fallback_tag());

    let first = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
    settle(&registry).await;
    let heads = registry.count_requests("HEAD", &tag_path);
    for _ in 0..3 {
        let again = referrer_list(referrers(&api, "app", &subject.digest, "").await).await;
        assert_eq!(again, first);
    }
    settle(&registry).await;
    assert_eq!(
        registry.count_requests("HEAD", &tag_path),
        heads,
        "the tag was rechecked within its TTL"
    );
    assert_eq!(first, vec![expected_descriptor(&sig)]);
}
